// The Python bindings of the conv3x3 family: conv3x3_forward / conv3x3_backward (algo
// "direct": conv3x3.cpp, "winograd": conv3x3_winograd.cpp) and conv3x3_act, conv3x3 + bias +
// activation in one pass (the NumPy reference, the composition of conv3x3 and the activation,
// is in pycnn/ops/conv.py).
//
// conv3x3_act forward: the convolution kernels take an Epilogue (conv3x3.hpp) that applies the
// activation (activation.hpp: its row function, looked up by name) to each stretch of output
// right after it is stored, while it is in L1: z = conv(x, w) + b never travels to memory on
// its own.  Backward: gz = g * act'(saved) by rows of (N, K, P) with the same per-element code
// (act::rows_backward), then the conv backward of the chosen algorithm on gz.
// What is saved for the backward pass: the output y where the activation's gradient can be
// read off it, the pre-activation z otherwise (act::saves_pre decides, for Python
// (conv3x3_act_saves_pre) and for the check here; csrc/act_rectifiers.cpp says why for each).
#include "common.hpp"
#include "activation.hpp"
#include "conv3x3.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace act = pycnn::act;
namespace cv = pycnn::conv;

using pycnn::as_array_like;
using pycnn::as_float_array;
using pycnn::data_of;
using pycnn::mutable_data_of;
using pycnn::shape_str;
using std::int64_t;

struct ConvDims { int64_t N, C, K, H, W; };

void require_shape(const char* fn, const char* name, const py::array& a, const std::vector<py::ssize_t>& shape) {
    if (pycnn::shape_of(a) != shape) {
        std::string want = "(";
        for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
        want += shape.size() == 1 ? ",)" : ")";
        throw py::value_error(std::string(fn) + ": " + name + " must have shape " + want + ", got " + shape_str(a));
    }
}

ConvDims conv_dims(const char* fn, const py::array& x, const py::array& w) {
    if (x.ndim() != 4) throw py::value_error(std::string(fn) + ": x must be (N, C, H, W), got shape " + shape_str(x));
    if (w.ndim() != 4 || w.shape(1) != x.shape(1) || w.shape(2) != 3 || w.shape(3) != 3) {
        throw py::value_error(std::string(fn) + ": weight must be (K, C, 3, 3) with C = " + std::to_string(x.shape(1)) +
                              " (the channels of x), got shape " + shape_str(w));
    }
    if (x.size() == 0 || w.shape(0) == 0) {
        throw py::value_error(std::string(fn) + ": x and weight must not be empty, got x " + shape_str(x) +
                              ", weight " + shape_str(w));
    }
    return {x.shape(0), x.shape(1), w.shape(0), x.shape(2), x.shape(3)};
}

enum class Algo { Direct, Winograd };

Algo parse_algo(const char* fn, const std::string& algo) {
    if (algo == "direct") return Algo::Direct;
    if (algo == "winograd") return Algo::Winograd;
    throw py::value_error(std::string(fn) + ": algo must be 'direct' or 'winograd', got '" + algo + "'");
}

// An optional argument: None, or an array like `ref`.
bool optional_array(const char* fn, const char* name, const py::object& obj, const py::array& ref, bool writeable,
                    py::array& out) {
    if (obj.is_none()) return false;
    out = as_array_like(fn, name, obj, "x", ref, writeable);
    return true;
}


// The prelu weight (K,): required for a per-channel activation (prelu), refused otherwise.
bool prelu_weight_arg(const char* fn, const act::ConvActivation& a, const py::object& obj, const py::array& x,
                      int64_t K, py::array& out) {
    const bool has = optional_array(fn, "prelu_weight", obj, x, false, out);
    if (has != a.per_channel) {
        throw py::value_error(std::string(fn) + (has ? ": prelu_weight must be None unless activation is 'prelu'"
                                                     : ": activation 'prelu' needs prelu_weight of shape (K,)"));
    }
    if (has) require_shape(fn, "prelu_weight", out, {K});
    return has;
}

void define(py::module_& m) {
    m.def(
        "conv3x3_forward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, const py::object& y_obj,
           const std::string& algo_name) {
            const char* fn = "conv3x3_forward";
            const Algo algo = parse_algo(fn, algo_name);
            py::array x = as_float_array(fn, "x", x_obj);
            py::array w = as_array_like(fn, "weight", w_obj, "x", x);
            py::array b, y = as_array_like(fn, "y", y_obj, "x", x, /*writeable=*/true);
            const ConvDims d = conv_dims(fn, x, w);
            const bool has_bias = optional_array(fn, "bias", b_obj, x, false, b);
            if (has_bias) require_shape(fn, "bias", b, {d.K});
            require_shape(fn, "y", y, {d.N, d.K, d.H, d.W});
            pycnn::dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = data_of<T>(x);
                const T* wp = data_of<T>(w);
                const T* bp = has_bias ? data_of<T>(b) : nullptr;
                T* yp = mutable_data_of<T>(y);
                py::gil_scoped_release nogil;
                if (algo == Algo::Direct) cv::direct_forward<T>(xp, wp, bp, yp, d.N, d.C, d.K, d.H, d.W);
                else cv::winograd_forward<T>(xp, wp, bp, yp, d.N, d.C, d.K, d.H, d.W);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("algo") = "direct",
        "x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None -> y (N, K, H, W) (overwritten): 3x3 "
        "cross-correlation, stride 1, zero padding 1.  algo: 'direct' or 'winograd' (F(2x2, 3x3)).");
    m.def(
        "conv3x3_backward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& g_obj, const py::object& gx_obj,
           const py::object& gw_obj, const py::object& gb_obj, const std::string& algo_name) {
            const char* fn = "conv3x3_backward";
            const Algo algo = parse_algo(fn, algo_name);
            py::array x = as_float_array(fn, "x", x_obj);
            py::array w = as_array_like(fn, "weight", w_obj, "x", x);
            py::array g = as_array_like(fn, "grad_y", g_obj, "x", x);
            const ConvDims d = conv_dims(fn, x, w);
            require_shape(fn, "grad_y", g, {d.N, d.K, d.H, d.W});
            py::array gx, gw, gb;
            const bool want_x = optional_array(fn, "grad_x", gx_obj, x, true, gx);
            const bool want_w = optional_array(fn, "grad_weight", gw_obj, x, true, gw);
            const bool want_b = optional_array(fn, "grad_bias", gb_obj, x, true, gb);
            if (want_x) require_shape(fn, "grad_x", gx, pycnn::shape_of(x));
            if (want_w) require_shape(fn, "grad_weight", gw, pycnn::shape_of(w));
            if (want_b) require_shape(fn, "grad_bias", gb, {d.K});
            pycnn::dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = data_of<T>(x);
                const T* wp = data_of<T>(w);
                const T* gp = data_of<T>(g);
                T* gxp = want_x ? mutable_data_of<T>(gx) : nullptr;
                T* gwp = want_w ? mutable_data_of<T>(gw) : nullptr;
                T* gbp = want_b ? mutable_data_of<T>(gb) : nullptr;
                py::gil_scoped_release nogil;
                cv::backward<T>(algo == Algo::Winograd, xp, wp, gp, gxp, gwp, gbp, d.N, d.C, d.K, d.H, d.W);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_weight"),
        py::arg("grad_bias"), py::arg("algo") = "direct",
        "Gradients of conv3x3_forward; each of grad_x, grad_weight, grad_bias is None (not computed) or "
        "an array to overwrite.  algo 'winograd' computes grad_x by Winograd F(2x2, 3x3) with the flipped "
        "filter; grad_weight is always computed directly.");
    m.def(
        "conv3x3_act_forward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, const py::object& a_obj,
           const py::object& y_obj, const py::object& pre_obj, const std::string& activation, double slope,
           double alpha, const std::string& algo_name) {
            const char* fn = "conv3x3_act_forward";
            const Algo algo = parse_algo(fn, algo_name);
            const act::ConvActivation& a_fns = act::conv_activation(fn, activation);
            py::array x = as_float_array(fn, "x", x_obj);
            py::array w = as_array_like(fn, "weight", w_obj, "x", x);
            py::array b, a, pre, y = as_array_like(fn, "y", y_obj, "x", x, /*writeable=*/true);
            const ConvDims d = conv_dims(fn, x, w);
            const bool has_bias = optional_array(fn, "bias", b_obj, x, false, b);
            if (has_bias) require_shape(fn, "bias", b, {d.K});
            const bool has_prelu = prelu_weight_arg(fn, a_fns, a_obj, x, d.K, a);
            const bool keep_pre = optional_array(fn, "pre", pre_obj, x, true, pre);
            require_shape(fn, "y", y, {d.N, d.K, d.H, d.W});
            if (keep_pre) require_shape(fn, "pre", pre, {d.N, d.K, d.H, d.W});
            pycnn::dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                cv::Epilogue<T> ep;
                ep.activation = a_fns.forward<T>();
                ep.params = act::make_params<T>(slope, alpha, has_prelu ? data_of<T>(a) : nullptr, d.K);
                ep.pre = keep_pre ? mutable_data_of<T>(pre) : nullptr;
                const T* xp = data_of<T>(x);
                const T* wp = data_of<T>(w);
                const T* bp = has_bias ? data_of<T>(b) : nullptr;
                T* yp = mutable_data_of<T>(y);
                py::gil_scoped_release nogil;
                if (algo == Algo::Direct) cv::direct_forward<T>(xp, wp, bp, yp, d.N, d.C, d.K, d.H, d.W, ep);
                else cv::winograd_forward<T>(xp, wp, bp, yp, d.N, d.C, d.K, d.H, d.W, ep);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"), py::arg("y"), py::arg("pre"),
        py::arg("activation"), py::arg("slope") = 0.01, py::arg("alpha") = 1.0, py::arg("algo") = "direct",
        "y = act(conv3x3(x, weight) + bias) in one pass (y overwritten).  activation: 'relu', 'leaky_relu' "
        "(slope), 'prelu' (prelu_weight (K,)), 'elu' (alpha) or 'swish'; prelu_weight is None for the others.  "
        "pre: None or an array (N, K, H, W) that receives the pre-activation (needed by the backward pass where "
        "conv3x3_act_saves_pre says so).");
    m.def(
        "conv3x3_act_backward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& a_obj, const py::object& s_obj,
           bool saved_is_pre, const py::object& g_obj, const py::object& gx_obj, const py::object& gw_obj,
           const py::object& gb_obj, const py::object& ga_obj, const std::string& activation, double slope,
           double alpha, const std::string& algo_name) {
            const char* fn = "conv3x3_act_backward";
            const Algo algo = parse_algo(fn, algo_name);
            const act::ConvActivation& a_fns = act::conv_activation(fn, activation);
            py::array x = as_float_array(fn, "x", x_obj);
            py::array w = as_array_like(fn, "weight", w_obj, "x", x);
            py::array saved = as_array_like(fn, "saved", s_obj, "x", x);
            py::array g = as_array_like(fn, "grad_y", g_obj, "x", x);
            const ConvDims d = conv_dims(fn, x, w);
            require_shape(fn, "saved", saved, {d.N, d.K, d.H, d.W});
            require_shape(fn, "grad_y", g, {d.N, d.K, d.H, d.W});
            py::array a, gx, gw, gb, ga;
            const bool has_prelu = prelu_weight_arg(fn, a_fns, a_obj, x, d.K, a);
            const bool want_x = optional_array(fn, "grad_x", gx_obj, x, true, gx);
            const bool want_w = optional_array(fn, "grad_weight", gw_obj, x, true, gw);
            const bool want_b = optional_array(fn, "grad_bias", gb_obj, x, true, gb);
            const bool want_a = optional_array(fn, "grad_prelu_weight", ga_obj, x, true, ga);
            if (want_x) require_shape(fn, "grad_x", gx, pycnn::shape_of(x));
            if (want_w) require_shape(fn, "grad_weight", gw, pycnn::shape_of(w));
            if (want_b) require_shape(fn, "grad_bias", gb, {d.K});
            if (want_a) {
                if (!has_prelu) throw py::value_error(std::string(fn) + ": grad_prelu_weight must be None unless "
                                                      "activation is 'prelu'");
                require_shape(fn, "grad_prelu_weight", ga, {d.K});
            }
            if (!saved_is_pre && act::saves_pre(fn, activation, slope, alpha, a_obj)) {
                throw py::value_error(std::string(fn) + ": activation '" + activation +
                                      "' with these parameters needs the pre-activation (saved_is_pre=True): "
                                      "its gradient can't be read off the output");
            }
            pycnn::dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const act::Params<T> params = act::make_params<T>(slope, alpha, has_prelu ? data_of<T>(a) : nullptr, d.K);
                const T* xp = data_of<T>(x);
                const T* wp = data_of<T>(w);
                const T* sp = data_of<T>(saved);
                const T* gp = data_of<T>(g);
                T* gxp = want_x ? mutable_data_of<T>(gx) : nullptr;
                T* gwp = want_w ? mutable_data_of<T>(gw) : nullptr;
                T* gbp = want_b ? mutable_data_of<T>(gb) : nullptr;
                T* gap = want_a ? mutable_data_of<T>(ga) : nullptr;
                py::gil_scoped_release nogil;
                const int64_t P = d.H * d.W;
                // gz: the gradient of the pre-activation (N, K, H, W), read by all three conv gradients
                std::unique_ptr<T[]> gz(new T[static_cast<size_t>(d.N * d.K * P)]);
                act::rows_backward<T>(a_fns.backward<T>(), sp, gp, gz.get(), gap, !saved_is_pre, d.N, d.K, P, params);
                cv::backward<T>(algo == Algo::Winograd, xp, wp, gz.get(), gxp, gwp, gbp, d.N, d.C, d.K, d.H, d.W);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("prelu_weight"), py::arg("saved"), py::arg("saved_is_pre"),
        py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("grad_prelu_weight"), py::arg("activation"), py::arg("slope") = 0.01, py::arg("alpha") = 1.0,
        py::arg("algo") = "direct",
        "Gradients of conv3x3_act_forward.  saved is the output y (saved_is_pre=False: relu, leaky_relu with "
        "slope >= 0, prelu with every slope > 0) or the pre-activation (saved_is_pre=True, required where "
        "conv3x3_act_saves_pre says so: elu and swish always).  Each gradient is None (not computed) or an "
        "array to overwrite.");
    m.def(
        "conv3x3_act_saves_pre",
        [](const std::string& activation, double slope, double alpha, const py::object& prelu_weight) {
            return act::saves_pre("conv3x3_act_saves_pre", activation, slope, alpha, prelu_weight);
        },
        py::arg("activation"), py::arg("slope") = 0.01, py::arg("alpha") = 1.0, py::arg("prelu_weight") = py::none(),
        "Whether conv3x3_act's backward pass needs the pre-activation (pre, saved_is_pre=True) for these "
        "parameters, rather than the output y: False for relu, leaky_relu with slope >= 0 and prelu with every "
        "slope of prelu_weight (K,) > 0 (y > 0 exactly where the pre-activation is); True otherwise (elu, "
        "swish).  prelu_weight: the slopes of 'prelu', None for the others.");
}

const pycnn::Bindings bindings(define);

}  // namespace
