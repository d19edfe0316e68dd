// sigmoid, tanh, maxout and dropout -- forward and backward, float32 and float64.  The NumPy
// references in pycnn/ops/activations.py and pycnn/ops/dropout.py are the spec.
//
// Like activations.cpp: every kernel is a map over the flat C-order index (maxout: over the
// rows (n, c) of the (N, C, k, S) view), OpenMP `parallel for simd` with a static schedule,
// the inner loop vectorised (AVX-512 with -march=native), outputs allocated by the caller,
// the GIL released around the loops.  These loops are memory-bound: see bench/.
//
//   sigmoid(x) = 1 / (1 + e)       for x >= 0,  e = exp(-|x|) <= 1: never overflows
//              = e / (1 + e)       for x <  0
//   tanh(x)    = sign(x) * -m / (2 + m),   m = expm1(-2|x|) in (-1, 0]: no cancellation near 0
//   Both backward passes read the saved input x, not the output y: y (1 - y) and 1 - y^2
//   cancel where y rounds to 1 (sigmoid'(20) = 2e-9, tanh'(10) = 8e-9 would be 0 in float32).
//     sigmoid'(x) = e / (1 + e)^2,      e = exp(-|x|)     (sigmoid' is even)
//     tanh'(x)    = 4 e / (1 + e)^2,    e = exp(-2|x|)
//   Products and quotients only: relatively accurate everywhere.  exp / expm1 on x <= 0 come
//   from vecmath.hpp (shared with elu).
//
//   dropout: element i is kept when uniform01(seed_key(seed), i) >= p (in T, as the
//   reference), kept elements are scaled by 1 / (1 - p): y = x * (keep ? scale : 0).  The
//   backward pass draws the same mask from the seed (the mask is never stored).
//
//   maxout: x (N, C*k, S) -> y (N, C, S), y[n, c, s] = max_j x[n, c*k + j, s]; the first
//   maximum wins ties and the first NaN wins (np.argmax); the winner j (uint8, so k <= 256)
//   is stored for the backward pass, which routes grad_y to it and writes 0 elsewhere.
#include "common.hpp"
#include "vecmath.hpp"

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace {

using pycnn::kParallelMinElements;
using std::int64_t;
using std::uint64_t;
using std::uint8_t;

constexpr int64_t kMaxPieces = 256;  // the winner is a uint8

// ------------------------------------------------------------------------------- kernels
// n is the number of elements; every array is C-contiguous with n elements.

template <typename T>
void sigmoid_forward_kernel(const T* x, T* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T xi = x[i];
        const T e = pycnn::exp_nonpositive<T>(-std::fabs(xi));  // NaN stays NaN
        const T s = T(1) / (T(1) + e);
        y[i] = xi >= T(0) ? s : e * s;
    }
}

// grad_in = grad_out * sigmoid'(x), x the saved input (the formula at the top)
template <typename T>
void sigmoid_backward_kernel(const T* x, const T* g, T* gi, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T e = pycnn::exp_nonpositive<T>(-std::fabs(x[i]));
        const T s = T(1) / (T(1) + e);
        gi[i] = g[i] * (e * s * s);
    }
}

template <typename T>
void tanh_forward_kernel(const T* x, T* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T xi = x[i];
        const T m = pycnn::expm1_nonpositive<T>(T(-2) * std::fabs(xi));
        y[i] = std::copysign(-m / (T(2) + m), xi);
    }
}

// grad_in = grad_out * tanh'(x), x the saved input (the formula at the top)
template <typename T>
void tanh_backward_kernel(const T* x, const T* g, T* gi, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T e = pycnn::exp_nonpositive<T>(T(-2) * std::fabs(x[i]));
        const T s = T(1) / (T(1) + e);
        gi[i] = g[i] * (T(4) * e * s * s);
    }
}

// out = v * (keep_i ? scale : 0): x in the forward pass, the incoming gradient in the backward.
template <typename T>
void dropout_kernel(const T* v, T* out, int64_t n, T p, T scale, uint64_t key) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T u = pycnn::uniform01<T>(key, static_cast<uint64_t>(i));
        out[i] = v[i] * (u >= p ? scale : T(0));
    }
}

// x is (R, k, S) with R = N*C rows; y and winner are (R, S).
template <typename T>
void maxout_forward_kernel(const T* x, T* y, uint8_t* winner, int64_t R, int64_t k, int64_t S) {
#pragma omp parallel for schedule(static) if (R * k * S >= kParallelMinElements)
    for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + r * k * S;
        T* yr = y + r * S;
        uint8_t* wr = winner + r * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
            yr[s] = xr[s];
            wr[s] = 0;
        }
        for (int64_t j = 1; j < k; ++j) {
            const T* xj = xr + j * S;
            const auto idx = static_cast<uint8_t>(j);
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) {
                const T v = xj[s], best = yr[s];
                // a larger value wins, a NaN wins over a number; ties and later NaNs lose
                const bool take = v > best || (v != v && best == best);
                yr[s] = take ? v : best;
                wr[s] = take ? idx : wr[s];
            }
        }
    }
}

// grad_x[r, j, s] = grad_y[r, s] where winner[r, s] == j else 0
template <typename T>
void maxout_backward_kernel(const T* gy, const uint8_t* winner, T* gx, int64_t R, int64_t k, int64_t S) {
#pragma omp parallel for schedule(static) if (R * k * S >= kParallelMinElements)
    for (int64_t r = 0; r < R; ++r) {
        const T* gr = gy + r * S;
        const uint8_t* wr = winner + r * S;
        for (int64_t j = 0; j < k; ++j) {
            T* gxj = gx + (r * k + j) * S;
            const auto idx = static_cast<uint8_t>(j);
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) gxj[s] = wr[s] == idx ? gr[s] : T(0);
        }
    }
}

// --------------------------------------------------------------------------- bindings
using pycnn::as_array;
using pycnn::as_array_like;
using pycnn::as_float_array;
using pycnn::check_same_shape;
using pycnn::dispatch_float;
using pycnn::shape_str;

template <typename T>
const T* in_ptr(const py::array& a) { return static_cast<const T*>(a.data()); }
template <typename T>
T* out_ptr(py::array& a) { return static_cast<T*>(a.mutable_data()); }

// out = f(a): a any shape (named `a_name`), out preallocated like a.
template <typename Launch>
void map_call(const char* fn, const char* a_name, const py::object& a_obj, const char* out_name,
              const py::object& out_obj, Launch launch) {
    py::array a = as_float_array(fn, a_name, a_obj);
    py::array out = as_array_like(fn, out_name, out_obj, a_name, a, /*writeable=*/true);
    check_same_shape(fn, out_name, out, a_name, a);
    const int64_t n = static_cast<int64_t>(a.size());
    dispatch_float(a, [&](auto zero) {
        using T = decltype(zero);
        const T* ap = in_ptr<T>(a);
        T* op = out_ptr<T>(out);
        py::gil_scoped_release nogil;
        launch(ap, op, n);
    });
}

// grad_in = f(x, grad_out): all three shaped like x, the saved input.
template <typename Launch>
void input_backward_call(const char* fn, const py::object& x_obj, const py::object& g_obj, const py::object& gi_obj,
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

void check_probability(const char* fn, double p) {
    if (!(p >= 0.0 && p <= 1.0)) {
        throw py::value_error(std::string(fn) + ": p must be a probability in [0, 1], got " + std::to_string(p));
    }
}

// dropout_forward(x, out, p, seed) and dropout_backward(grad_out, grad_in, p, seed): the same map.
void dropout_call(const char* fn, const char* v_name, const py::object& v, const char* out_name,
                  const py::object& out, double p, uint64_t seed) {
    check_probability(fn, p);
    const uint64_t key = pycnn::seed_key(seed);
    map_call(fn, v_name, v, out_name, out, [=](auto vp, auto op, int64_t n) {
        using T = std::remove_cv_t<std::remove_pointer_t<decltype(vp)>>;
        // p = 1 drops everything (u < 1 <= p); scale 0 there rather than 1 / 0
        const T scale = p < 1.0 ? static_cast<T>(1.0 / (1.0 - p)) : T(0);
        dropout_kernel<T>(vp, op, n, static_cast<T>(p), scale, key);
    });
}

// maxout: x (N, C*k, ...) and y (N, C, ...).  Returns (R = N*C, S).
struct MaxoutDims { int64_t R, S; };

MaxoutDims maxout_dims(const char* fn, const char* x_name, const py::array& x, const char* y_name, const py::array& y,
                       int64_t pieces) {
    if (pieces < 1 || pieces > kMaxPieces) {
        throw py::value_error(std::string(fn) + ": pieces must be in [1, 256] (the winner is a uint8), got " +
                              std::to_string(pieces));
    }
    if (x.ndim() < 2) {
        throw py::value_error(std::string(fn) + ": " + x_name +
                              " must have at least 2 dimensions (N, C*k, ...), got shape " + shape_str(x));
    }
    if (x.shape(1) % pieces != 0) {
        throw py::value_error(std::string(fn) + ": " + x_name + " must have a channel count divisible by pieces=" +
                              std::to_string(pieces) + ", got shape " + shape_str(x));
    }
    auto expected = pycnn::shape_of(x);
    expected[1] /= pieces;
    if (pycnn::shape_of(y) != expected) {
        py::array want(x.dtype(), expected);  // only for its shape string
        throw py::value_error(std::string(fn) + ": " + y_name + " must have shape " + shape_str(want) + " (" + x_name +
                              " with C*k / pieces channels), got " + shape_str(y));
    }
    int64_t S = 1;
    for (py::ssize_t d = 2; d < x.ndim(); ++d) S *= x.shape(d);
    return {static_cast<int64_t>(x.shape(0) * expected[1]), S};
}

py::array as_winner(const char* fn, const py::object& obj, const py::array& y, const char* y_name, bool writeable) {
    py::array w = as_array(fn, "winner", obj, writeable);
    if (!w.dtype().equal(py::dtype::of<uint8_t>())) {
        throw py::type_error(std::string(fn) + ": winner must be uint8, got " + pycnn::dtype_name(w));
    }
    check_same_shape(fn, "winner", w, y_name, y);
    return w;
}

}  // namespace

void register_maps(py::module_& m) {
    // --------------------------------------------------------------------- sigmoid
    m.def(
        "sigmoid_forward",
        [](const py::object& x, const py::object& out) {
            map_call("sigmoid_forward", "x", x, "out", out,
                     [](auto xp, auto op, int64_t n) { sigmoid_forward_kernel(xp, op, n); });
        },
        py::arg("x"), py::arg("out"), "out = 1 / (1 + exp(-x)) (finite for every finite x).");
    m.def(
        "sigmoid_backward",
        [](const py::object& x, const py::object& grad_out, const py::object& grad_in) {
            input_backward_call("sigmoid_backward", x, grad_out, grad_in,
                                [](auto xp, auto gp, auto gip, int64_t n) { sigmoid_backward_kernel(xp, gp, gip, n); });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"),
        "x is the forward input: grad_in = grad_out * sigmoid(x) * sigmoid(-x) = grad_out * e / (1 + e)^2, "
        "e = exp(-|x|).");

    // ------------------------------------------------------------------------ tanh
    m.def(
        "tanh_forward",
        [](const py::object& x, const py::object& out) {
            map_call("tanh_forward", "x", x, "out", out,
                     [](auto xp, auto op, int64_t n) { tanh_forward_kernel(xp, op, n); });
        },
        py::arg("x"), py::arg("out"), "out = tanh(x).");
    m.def(
        "tanh_backward",
        [](const py::object& x, const py::object& grad_out, const py::object& grad_in) {
            input_backward_call("tanh_backward", x, grad_out, grad_in,
                                [](auto xp, auto gp, auto gip, int64_t n) { tanh_backward_kernel(xp, gp, gip, n); });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"),
        "x is the forward input: grad_in = grad_out * (1 - tanh(x)^2) = grad_out * 4 e / (1 + e)^2, "
        "e = exp(-2|x|).");

    // --------------------------------------------------------------------- dropout
    m.def(
        "dropout_forward",
        [](const py::object& x, const py::object& out, double p, uint64_t seed) {
            dropout_call("dropout_forward", "x", x, "out", out, p, seed);
        },
        py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"),
        "Inverted dropout in training: out = x / (1 - p) where counter_uniform(seed)[i] >= p, else 0.");
    m.def(
        "dropout_backward",
        [](const py::object& grad_out, const py::object& grad_in, double p, uint64_t seed) {
            dropout_call("dropout_backward", "grad_out", grad_out, "grad_in", grad_in, p, seed);
        },
        py::arg("grad_out"), py::arg("grad_in"), py::arg("p"), py::arg("seed"),
        "grad_in = grad_out * the mask of dropout_forward(p, seed), drawn again from the seed.");

    // ---------------------------------------------------------------------- maxout
    m.def(
        "maxout_forward",
        [](const py::object& x_obj, const py::object& y_obj, const py::object& w_obj, int64_t pieces) {
            const char* fn = "maxout_forward";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array y = as_array_like(fn, "y", y_obj, "x", x, true);
            const MaxoutDims d = maxout_dims(fn, "x", x, "y", y, pieces);
            py::array w = as_winner(fn, w_obj, y, "y", true);
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = in_ptr<T>(x);
                T* yp = out_ptr<T>(y);
                auto* wp = static_cast<uint8_t*>(w.mutable_data());
                py::gil_scoped_release nogil;
                maxout_forward_kernel<T>(xp, yp, wp, d.R, pieces, d.S);
            });
        },
        py::arg("x"), py::arg("y"), py::arg("winner"), py::arg("pieces"),
        "x (N, C*k, ...) -> y (N, C, ...) = max over each group of k = pieces consecutive channels, and winner "
        "(uint8, shaped like y): the index of the first maximum in its group (a NaN wins).");
    m.def(
        "maxout_backward",
        [](const py::object& gy_obj, const py::object& w_obj, const py::object& gx_obj, int64_t pieces) {
            const char* fn = "maxout_backward";
            py::array gy = as_float_array(fn, "grad_y", gy_obj);
            py::array gx = as_array_like(fn, "grad_x", gx_obj, "grad_y", gy, true);
            const MaxoutDims d = maxout_dims(fn, "grad_x", gx, "grad_y", gy, pieces);
            py::array w = as_winner(fn, w_obj, gy, "grad_y", false);
            dispatch_float(gy, [&](auto zero) {
                using T = decltype(zero);
                const T* gyp = in_ptr<T>(gy);
                T* gxp = out_ptr<T>(gx);
                const auto* wp = static_cast<const uint8_t*>(w.data());
                py::gil_scoped_release nogil;
                maxout_backward_kernel<T>(gyp, wp, gxp, d.R, pieces, d.S);
            });
        },
        py::arg("grad_y"), py::arg("winner"), py::arg("grad_x"), py::arg("pieces"),
        "grad_x (N, C*k, ...): grad_y routed to the winner of each group, 0 elsewhere (overwritten).");
}
