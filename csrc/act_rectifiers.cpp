// The rectifier family: relu, leaky_relu, prelu, rrelu, elu -- forward and backward, float32
// and float64, as functors of activation.hpp (relu, leaky_relu, prelu and elu are also
// conv3x3_act activations).  The NumPy references in pycnn/ops/activations.py are the spec.
//
// The maps are OpenMP `parallel for simd` over the flat C-order index (prelu: over rows of
// the (N, C, S) view) with a static schedule: each thread streams one contiguous block, the
// inner loop is vectorised.  They are memory-bound: the limit is the bytes read + written
// (see bench/).
//
// Subgradient at z == 0: the negative branch (0 for relu, the slope otherwise), as PyTorch.
// Which gradients can be read off the output y (the rule is pycnn/ops/conv.py's grad_from_output,
// read from the specs in pycnn/ops/activations.py; conv3x3_act keeps y alone then); why:
//   relu, leaky_relu with slope >= 0, prelu with every slope > 0: y > 0 exactly when z > 0,
//     and prelu's weight gradient sum_{z<=0} g*z is (sum_{y<=0} g*y) / a[k].
//   leaky_relu with slope < 0, prelu with a slope <= 0: y >= 0 on both branches (or y = 0 on
//     the negative one): the output no longer tells the branches apart or gives z back.
//   elu (any alpha): its derivative alpha*exp(z) can't be read off y = alpha*expm1(z): y + alpha
//     cancels as y -> -alpha (z = -20: y rounds to -alpha in float32, and y + alpha = 0 where
//     alpha*exp(z) = 2e-9).
#include "activation.hpp"
#include "vecmath.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace {

using pycnn::act::Params;
using pycnn::act::Scalar;
using std::int64_t;
using std::uint64_t;

// ------------------------------------------------------------------------------ functors
struct Relu : pycnn::act::Functor {
    static constexpr const char* kName = "relu";
    template <typename T>
    static T forward(T z, const Params<T>&) { return z < T(0) ? T(0) : z; }  // NaN stays NaN, like np.maximum
    template <typename T>
    static T backward(T s, T g, const Params<T>&) { return s > T(0) ? g : T(0); }
};

// y = z where z > 0 else slope * z  (and rrelu, with its own slope per element)
struct LeakyRelu : pycnn::act::Functor {
    static constexpr const char* kName = "leaky_relu";
    static constexpr Scalar kScalar = Scalar::Slope;
    static constexpr double kScalarDefault = 0.01;
    template <typename T>
    static T forward(T z, const Params<T>& p) { return z > T(0) ? z : z * p.slope; }
    template <typename T>
    static T backward(T s, T g, const Params<T>& p) { return s > T(0) ? g : g * p.slope; }
};

// leaky_relu with one slope per channel (p.slope, resolved per row by Params::channel)
struct Prelu : pycnn::act::Functor {
    static constexpr const char* kName = "prelu";
    static constexpr bool kPerChannel = true;
    template <typename T>
    static T forward(T z, const Params<T>& p) { return LeakyRelu::forward(z, p); }
    template <typename T>
    static T backward(T s, T g, const Params<T>& p) { return LeakyRelu::backward(s, g, p); }
    // d loss / d slope: g * z where z <= 0
    template <typename T>
    static double weight_grad(T s, T g) { return s > T(0) ? 0.0 : static_cast<double>(g) * static_cast<double>(s); }
};

// y = z where z > 0 else alpha * expm1(z)  (exp / expm1 for z <= 0: vecmath.hpp)
struct Elu : pycnn::act::Functor {
    static constexpr const char* kName = "elu";
    static constexpr Scalar kScalar = Scalar::Alpha;
    static constexpr double kScalarDefault = 1.0;
    template <typename T>
    static T forward(T z, const Params<T>& p) {
        const T neg = p.alpha * pycnn::expm1_nonpositive<T>(z > T(0) ? T(0) : z);
        return z > T(0) ? z : neg;
    }
    template <typename T>
    static T backward(T s, T g, const Params<T>& p) {
        const T neg = g * p.alpha * pycnn::exp_nonpositive<T>(s > T(0) ? T(0) : s);
        return s > T(0) ? g : neg;
    }
};

const pycnn::act::ConvRegistrar<Relu> relu_conv;
const pycnn::act::ConvRegistrar<LeakyRelu> leaky_relu_conv;
const pycnn::act::ConvRegistrar<Prelu> prelu_conv;
const pycnn::act::ConvRegistrar<Elu> elu_conv;

// rrelu in training: element i is leaky_relu with slope 1 / (lower + (upper - lower) * u_i),
// u_i the counter-based uniform of (seed, i), computed in T like the reference.  Forward:
// out = leaky(x); backward: out = leaky'(x) * v, v the incoming gradient.
template <bool kBackward, typename T>
void rrelu_train_kernel(const T* x, const T* v, T* out, int64_t n, T lower, T range, uint64_t key) {
#pragma omp parallel for simd schedule(static) if (n >= pycnn::kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T u = pycnn::uniform01<T>(key, static_cast<uint64_t>(i));
        Params<T> p;
        p.slope = T(1) / (lower + range * u);
        out[i] = kBackward ? LeakyRelu::backward(x[i], v[i], p) : LeakyRelu::forward(x[i], p);
    }
}

// --------------------------------------------------------------------------- bindings
using pycnn::as_array_like;
using pycnn::as_float_array;
using pycnn::check_same_shape;
using pycnn::data_of;
using pycnn::dispatch_float;
using pycnn::element_t;
using pycnn::mutable_data_of;

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

template <typename T>
Params<T> prelu_params(const py::array& w) {
    return pycnn::act::make_params<T>(0.0, 1.0, data_of<T>(w), static_cast<int64_t>(w.size()));
}

void check_rrelu_bounds(const char* fn, double lower, double upper) {
    if (!(lower > 0.0) || !(upper >= lower) || !std::isfinite(upper)) {
        throw py::value_error(std::string(fn) + ": need 0 < lower <= upper (finite), got lower=" +
                              std::to_string(lower) + ", upper=" + std::to_string(upper));
    }
}

// rrelu_forward and rrelu_backward: `v` is x (forward) or grad_out (backward).
template <bool kBackward, typename T>
void rrelu_kernel(const T* x, const T* v, T* out, int64_t n, double lower, double upper, uint64_t seed,
                  bool training) {
    if (training) {
        rrelu_train_kernel<kBackward, T>(x, v, out, n, static_cast<T>(lower), static_cast<T>(upper - lower),
                                         pycnn::seed_key(seed));
        return;
    }
    Params<T> p;
    p.slope = static_cast<T>(2.0 / (lower + upper));
    if (kBackward) pycnn::act::map_backward<LeakyRelu, T>(x, v, out, n, p);
    else pycnn::act::map_forward<LeakyRelu, T>(x, out, n, p);
}

void define(py::module_& m) {
    using pycnn::act::def_map;
    def_map<Relu>(m, "out = max(x, 0).", "grad_in = grad_out where x > 0 else 0.");
    def_map<LeakyRelu>(m, "out = x where x > 0 else slope * x.",
                       "grad_in = grad_out where x > 0 else slope * grad_out.");
    def_map<Elu>(m, "out = x where x > 0 else alpha * expm1(x).",
                 "grad_in = grad_out where x > 0 else grad_out * alpha * exp(x).");

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
                const T* xp = data_of<T>(x);
                T* op = mutable_data_of<T>(out);
                const Params<T> p = prelu_params<T>(w);
                py::gil_scoped_release nogil;
                auto row = [](const T* z, T* y, int64_t n, const Params<T>& q) {  // inlined, unlike a pointer
                    pycnn::act::row_forward<Prelu, T>(z, y, n, q);
                };
                pycnn::act::rows_forward<T>(row, xp, op, d.N, d.C, d.S, p);
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
                const T* xp = data_of<T>(x);
                const T* gp = data_of<T>(g);
                T* gip = mutable_data_of<T>(gi);
                T* gwp = mutable_data_of<T>(gw);
                const Params<T> p = prelu_params<T>(w);
                py::gil_scoped_release nogil;
                auto row = [](const T* s, const T* g, T* gi, int64_t n, const Params<T>& q) {
                    return pycnn::act::row_backward<Prelu, T>(s, g, gi, n, q);
                };
                pycnn::act::rows_backward<T>(row, xp, gp, gip, gwp, false, d.N, d.C, d.S, p);
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
            pycnn::map_call("rrelu_forward", "x", x, "out", out, [=](auto xp, auto op, int64_t n) {
                rrelu_kernel<false>(xp, xp, op, n, lower, upper, seed, training);
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
            pycnn::map_backward_call("rrelu_backward", x, grad_out, grad_in, [=](auto xp, auto gp, auto gip, int64_t n) {
                rrelu_kernel<true>(xp, gp, gip, n, lower, upper, seed, training);
            });
        },
        py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), py::arg("lower") = 3.0, py::arg("upper") = 8.0,
        py::arg("seed") = 0, py::arg("training") = false,
        "Gradient of rrelu_forward; the slopes are regenerated from the seed.");
}

const pycnn::Bindings bindings(define);

}  // namespace
