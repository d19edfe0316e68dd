// The rectifier family: relu, leaky_relu, prelu, rrelu, elu -- forward and backward,
// float32 and float64.  The NumPy references in pycnn/ops/activations.py are the spec.
//
// Every kernel is a map over the flat C-order index (prelu: over rows of the (N, C, S)
// view), OpenMP `parallel for simd` with a static schedule: each thread streams one
// contiguous block, the inner loop is vectorised (AVX-512 with -march=native).  These
// loops are memory-bound: the limit is the bytes read + written (see bench/).
// Outputs are allocated by the caller and passed in; the GIL is released around the loops.
//
// Subgradient at x == 0: the negative branch (0 for relu, the slope otherwise), as PyTorch.
#include "common.hpp"
#include "vecmath.hpp"

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using pycnn::kParallelMinElements;
using std::int64_t;
using std::uint64_t;

// exp / expm1 for x <= 0: csrc/vecmath.hpp
using pycnn::exp_nonpositive;
using pycnn::expm1_nonpositive;

// ------------------------------------------------------------------------------- kernels
// n is the number of elements; every array is C-contiguous with n elements.

template <typename T>
void relu_forward_kernel(const T* x, T* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] < T(0) ? T(0) : x[i];  // NaN stays NaN, like np.maximum
}

template <typename T>
void relu_backward_kernel(const T* x, const T* g, T* gi, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) gi[i] = x[i] > T(0) ? g[i] : T(0);
}

// y = x where x > 0 else slope * x  (leaky_relu, and rrelu in evaluation)
template <typename T>
void leaky_forward_kernel(const T* x, T* y, int64_t n, T slope) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] > T(0) ? x[i] : x[i] * slope;
}

template <typename T>
void leaky_backward_kernel(const T* x, const T* g, T* gi, int64_t n, T slope) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) gi[i] = x[i] > T(0) ? g[i] : g[i] * slope;
}

// rrelu in training: element i has slope 1 / (lower + (upper - lower) * u_i), u_i the
// counter-based uniform of (seed, i), computed in T like the reference.  `v` is x in the
// forward pass (y = v or slope * v) and the incoming gradient in the backward pass.
template <typename T>
void rrelu_train_kernel(const T* x, const T* v, T* out, int64_t n, T lower, T range, uint64_t key) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T u = pycnn::uniform01<T>(key, static_cast<uint64_t>(i));
        const T slope = T(1) / (lower + range * u);
        out[i] = x[i] > T(0) ? v[i] : v[i] * slope;
    }
}

template <typename T>
void elu_forward_kernel(const T* x, T* y, int64_t n, T alpha) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T xi = x[i];
        const T neg = alpha * expm1_nonpositive<T>(xi > T(0) ? T(0) : xi);
        y[i] = xi > T(0) ? xi : neg;
    }
}

template <typename T>
void elu_backward_kernel(const T* x, const T* g, T* gi, int64_t n, T alpha) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T xi = x[i];
        const T neg = g[i] * alpha * exp_nonpositive<T>(xi > T(0) ? T(0) : xi);
        gi[i] = xi > T(0) ? g[i] : neg;
    }
}

// prelu: x viewed as (N, C, S); row r = n*C + c is S contiguous elements with slope w[c].
template <typename T>
void prelu_forward_kernel(const T* x, const T* w, T* y, int64_t N, int64_t C, int64_t S) {
    const int64_t rows = N * C;
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T wc = w[r % C];
        const T* xr = x + r * S;
        T* yr = y + r * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) yr[s] = xr[s] > T(0) ? xr[s] : xr[s] * wc;
    }
}

// grad_in = g where x > 0 else w[c] * g;  grad_w[c] = sum over n, s of g * x where x <= 0.
// Each row sums into its own double (no races), then the rows of a channel are added in
// order of n: the result does not depend on the number of threads.  grad_w is overwritten.
template <typename T>
void prelu_backward_kernel(const T* x, const T* w, const T* g, T* gi, T* gw, int64_t N, int64_t C, int64_t S) {
    const int64_t rows = N * C;
    std::vector<double> row_sum(static_cast<size_t>(rows));
    double* row_sum_p = row_sum.data();
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) {
        const T wc = w[r % C];
        const T* xr = x + r * S;
        const T* gr = g + r * S;
        T* gir = gi + r * S;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t s = 0; s < S; ++s) {
            const bool pos = xr[s] > T(0);
            gir[s] = pos ? gr[s] : gr[s] * wc;
            acc += pos ? 0.0 : static_cast<double>(gr[s]) * static_cast<double>(xr[s]);
        }
        row_sum_p[r] = acc;
    }
    for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) acc += row_sum_p[n * C + c];
        gw[c] = static_cast<T>(acc);
    }
}

// --------------------------------------------------------------------------- bindings
using pycnn::as_array_like;
using pycnn::as_float_array;
using pycnn::check_same_shape;
using pycnn::dispatch_float;

template <typename T>
const T* in_ptr(const py::array& a) { return static_cast<const T*>(a.data()); }
template <typename T>
T* out_ptr(py::array& a) { return static_cast<T*>(a.mutable_data()); }

// out = f(x): x any shape, out preallocated like x.
template <typename Launch>
void unary_call(const char* fn, const py::object& x_obj, const py::object& out_obj, Launch launch) {
    py::array x = as_float_array(fn, "x", x_obj);
    py::array out = as_array_like(fn, "out", out_obj, "x", x, /*writeable=*/true);
    check_same_shape(fn, "out", out, "x", x);
    const int64_t n = static_cast<int64_t>(x.size());
    dispatch_float(x, [&](auto zero) {
        using T = decltype(zero);
        const T* xp = in_ptr<T>(x);
        T* op = out_ptr<T>(out);
        py::gil_scoped_release nogil;
        launch(xp, op, n);
    });
}

// grad_in = f(x, grad_out): all three shaped like x.
template <typename Launch>
void backward_call(const char* fn, const py::object& x_obj, const py::object& g_obj, const py::object& gi_obj,
                   Launch launch) {
    py::array x = as_float_array(fn, "x", x_obj);
    py::array g = as_array_like(fn, "grad_out", g_obj, "x", x);
    py::array gi = as_array_like(fn, "grad_in", gi_obj, "x", x, /*writeable=*/true);
    check_same_shape(fn, "grad_out", g, "x", x);
    check_same_shape(fn, "grad_in", gi, "x", x);
    const int64_t n = static_cast<int64_t>(x.size());
    dispatch_float(x, [&](auto zero) {
        using T = decltype(zero);
        const T* xp = in_ptr<T>(x);
        const T* gp = in_ptr<T>(g);
        T* gip = out_ptr<T>(gi);
        py::gil_scoped_release nogil;
        launch(xp, gp, gip, n);
    });
}

// prelu: x is (N, C, ...), weight is (C,).  Returns (N, C, S).
struct PreluDims { int64_t N, C, S; };

PreluDims prelu_dims(const char* fn, const py::array& x, const py::array& weight) {
    if (x.ndim() < 2) {
        throw py::value_error(std::string(fn) + ": x must have at least 2 dimensions (N, C, ...), got shape " +
                              pycnn::shape_str(x));
    }
    if (weight.ndim() != 1 || weight.shape(0) != x.shape(1)) {
        throw py::value_error(std::string(fn) + ": weight must have shape (C,) = (" + std::to_string(x.shape(1)) +
                              ",), one slope per channel of x, got " + pycnn::shape_str(weight));
    }
    int64_t S = 1;
    for (py::ssize_t d = 2; d < x.ndim(); ++d) S *= x.shape(d);
    return {static_cast<int64_t>(x.shape(0)), static_cast<int64_t>(x.shape(1)), S};
}

void check_rrelu_bounds(const char* fn, double lower, double upper) {
    if (!(lower > 0.0) || !(upper >= lower) || !std::isfinite(upper)) {
        throw py::value_error(std::string(fn) + ": need 0 < lower <= upper (finite), got lower=" +
                              std::to_string(lower) + ", upper=" + std::to_string(upper));
    }
}

}  // namespace

void register_activations(py::module_& m) {
    using pycnn::seed_key;

    // ------------------------------------------------------------------------ relu
    m.def(
        "relu_forward",
        [](const py::object& x, const py::object& out) {
            unary_call("relu_forward", x, out, [](auto xp, auto op, int64_t n) { relu_forward_kernel(xp, op, n); });
        },
        py::arg("x"), py::arg("out"), "out = max(x, 0).");
    m.def(
        "relu_backward",
        [](const py::object& x, const py::object& grad_out, const py::object& grad_in) {
            backward_call("relu_backward", x, grad_out, grad_in,
                          [](auto xp, auto gp, auto gip, int64_t n) { relu_backward_kernel(xp, gp, gip, n); });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), "grad_in = grad_out where x > 0 else 0.");

    // ------------------------------------------------------------------ leaky_relu
    m.def(
        "leaky_relu_forward",
        [](const py::object& x, const py::object& out, double slope) {
            unary_call("leaky_relu_forward", x, out, [slope](auto xp, auto op, int64_t n) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
                leaky_forward_kernel<T>(xp, op, n, static_cast<T>(slope));
            });
        },
        py::arg("x"), py::arg("out"), py::arg("slope") = 0.01, "out = x where x > 0 else slope * x.");
    m.def(
        "leaky_relu_backward",
        [](const py::object& x, const py::object& grad_out, const py::object& grad_in, double slope) {
            backward_call("leaky_relu_backward", x, grad_out, grad_in, [slope](auto xp, auto gp, auto gip, int64_t n) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
                leaky_backward_kernel<T>(xp, gp, gip, n, static_cast<T>(slope));
            });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), py::arg("slope") = 0.01,
        "grad_in = grad_out where x > 0 else slope * grad_out.");

    // ----------------------------------------------------------------------- prelu
    m.def(
        "prelu_forward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& out_obj) {
            const char* fn = "prelu_forward";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array w = as_array_like(fn, "weight", w_obj, "x", x);
            py::array out = as_array_like(fn, "out", out_obj, "x", x, true);
            const PreluDims d = prelu_dims(fn, x, w);
            check_same_shape(fn, "out", out, "x", x);
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = in_ptr<T>(x);
                const T* wp = in_ptr<T>(w);
                T* op = out_ptr<T>(out);
                py::gil_scoped_release nogil;
                prelu_forward_kernel<T>(xp, wp, op, d.N, d.C, d.S);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("out"),
        "x is (N, C, ...), weight (C,): out = x where x > 0 else weight[c] * x.");
    m.def(
        "prelu_backward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& g_obj, const py::object& gi_obj,
           const py::object& gw_obj) {
            const char* fn = "prelu_backward";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array w = as_array_like(fn, "weight", w_obj, "x", x);
            py::array g = as_array_like(fn, "grad_out", g_obj, "x", x);
            py::array gi = as_array_like(fn, "grad_in", gi_obj, "x", x, true);
            py::array gw = as_array_like(fn, "grad_weight", gw_obj, "x", x, true);
            const PreluDims d = prelu_dims(fn, x, w);
            check_same_shape(fn, "grad_out", g, "x", x);
            check_same_shape(fn, "grad_in", gi, "x", x);
            check_same_shape(fn, "grad_weight", gw, "weight", w);
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = in_ptr<T>(x);
                const T* wp = in_ptr<T>(w);
                const T* gp = in_ptr<T>(g);
                T* gip = out_ptr<T>(gi);
                T* gwp = out_ptr<T>(gw);
                py::gil_scoped_release nogil;
                prelu_backward_kernel<T>(xp, wp, gp, gip, gwp, d.N, d.C, d.S);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("grad_out"), py::arg("grad_in"), py::arg("grad_weight"),
        "grad_in = grad_out where x > 0 else weight[c] * grad_out; grad_weight (overwritten) = "
        "sum over all axes but 1 of grad_out * x where x <= 0.");

    // ----------------------------------------------------------------------- rrelu
    m.def(
        "rrelu_forward",
        [](const py::object& x, const py::object& out, double lower, double upper, uint64_t seed, bool training) {
            check_rrelu_bounds("rrelu_forward", lower, upper);
            unary_call("rrelu_forward", x, out, [=](auto xp, auto op, int64_t n) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
                if (training) {
                    rrelu_train_kernel<T>(xp, xp, op, n, static_cast<T>(lower), static_cast<T>(upper - lower),
                                          seed_key(seed));
                } else {
                    leaky_forward_kernel<T>(xp, op, n, static_cast<T>(2.0 / (lower + upper)));
                }
            });
        },
        py::arg("x"), py::arg("out"), py::arg("lower") = 3.0, py::arg("upper") = 8.0, py::arg("seed") = 0,
        py::arg("training") = false,
        "Randomized leaky ReLU.  Training: slope_i = 1 / (lower + (upper - lower) * u_i), u_i = "
        "counter_uniform(seed)[i]; evaluation: slope = 2 / (lower + upper).");
    m.def(
        "rrelu_backward",
        [](const py::object& x, const py::object& grad_out, const py::object& grad_in, double lower, double upper,
           uint64_t seed, bool training) {
            check_rrelu_bounds("rrelu_backward", lower, upper);
            backward_call("rrelu_backward", x, grad_out, grad_in, [=](auto xp, auto gp, auto gip, int64_t n) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
                if (training) {
                    rrelu_train_kernel<T>(xp, gp, gip, n, static_cast<T>(lower), static_cast<T>(upper - lower),
                                          seed_key(seed));
                } else {
                    leaky_backward_kernel<T>(xp, gp, gip, n, static_cast<T>(2.0 / (lower + upper)));
                }
            });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), py::arg("lower") = 3.0, py::arg("upper") = 8.0,
        py::arg("seed") = 0, py::arg("training") = false,
        "Gradient of rrelu_forward; the slopes are regenerated from the seed.");

    // ------------------------------------------------------------------------- elu
    m.def(
        "elu_forward",
        [](const py::object& x, const py::object& out, double alpha) {
            unary_call("elu_forward", x, out, [alpha](auto xp, auto op, int64_t n) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
                elu_forward_kernel<T>(xp, op, n, static_cast<T>(alpha));
            });
        },
        py::arg("x"), py::arg("out"), py::arg("alpha") = 1.0, "out = x where x > 0 else alpha * expm1(x).");
    m.def(
        "elu_backward",
        [](const py::object& x, const py::object& grad_out, const py::object& grad_in, double alpha) {
            backward_call("elu_backward", x, grad_out, grad_in, [alpha](auto xp, auto gp, auto gip, int64_t n) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
                elu_backward_kernel<T>(xp, gp, gip, n, static_cast<T>(alpha));
            });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), py::arg("alpha") = 1.0,
        "grad_in = grad_out where x > 0 else grad_out * alpha * exp(x).");

    // ---------------------------------------------------------------- random numbers
    m.def("seed_key", &seed_key, py::arg("seed"), "The 64-bit stream key of a seed (as pycnn.ops._util.seed_key).");
    m.def(
        "counter_uniform",
        [](uint64_t seed, int64_t n, const py::object& dtype_obj) -> py::array {
            if (n < 0) throw py::value_error("counter_uniform: n must be >= 0, got " + std::to_string(n));
            const py::dtype dtype = py::dtype::from_args(dtype_obj);
            const uint64_t key = seed_key(seed);
            auto fill = [&](auto zero) -> py::array {
                using T = decltype(zero);
                py::array_t<T> out(static_cast<py::ssize_t>(n));
                T* p = out.mutable_data();
                {
                    py::gil_scoped_release nogil;
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
                    for (int64_t i = 0; i < n; ++i) p[i] = pycnn::uniform01<T>(key, static_cast<uint64_t>(i));
                }
                return std::move(out);
            };
            if (dtype.equal(py::dtype::of<float>())) return fill(float{});
            if (dtype.equal(py::dtype::of<double>())) return fill(double{});
            throw py::type_error("counter_uniform: dtype must be float32 or float64, got " +
                                 py::str(dtype).cast<std::string>());
        },
        py::arg("seed"), py::arg("n"), py::arg("dtype") = py::dtype::of<float>(),
        "n counter-based U[0, 1) numbers for seed (as pycnn.ops._util.uniform; a test helper: it allocates).");
}
