// The Python bindings of the conv3x3 family, the same names as the CUDA backend's:
//   conv3x3_forward      y = conv(x, w) + b
//   conv3x3_grad_x       grad_x of it
//   conv3x3_grad_weight  grad_weight and grad_bias of it (both read x and grad_y; either may be None)
//   conv3x3_act_forward / conv3x3_act_backward: conv3x3 + bias + activation in one pass, and its
//       whole backward pass in one call (the gradient of the pre-activation, computed once, feeds
//       grad_x, grad_weight, grad_bias and grad_prelu_weight)
// for the algorithms "direct" (conv3x3.cpp), "winograd" (F(2x2, 3x3): conv3x3_winograd.cpp) and
// "winograd4" (F(4x4, 3x3): conv3x3_winograd4.cpp); the NumPy reference (the composition of
// conv3x3 and the activation) is in pycnn/ops/conv.py.
//
// conv3x3_act forward: the convolution kernels take an Epilogue (conv3x3.hpp) that applies the
// activation (activation.hpp: its row function, looked up by name) to each stretch of output
// right after it is stored, while it is in L1: z = conv(x, w) + b never travels to memory on
// its own.  Backward: gz = g * act'(saved) by rows of (N, K, P) with the same per-element code
// (act::rows_backward), then the conv gradients of the chosen algorithm on gz.
// What is saved for the backward pass, the output y or the pre-activation z, is the caller's
// choice (pycnn/ops/conv.py: grad_from_output, the one rule), told by saved_is_pre.
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

using cv::Algo;

Algo parse_algo(const char* fn, const std::string& algo) {
    if (algo == "direct") return Algo::Direct;
    if (algo == "winograd") return Algo::Winograd;
    if (algo == "winograd4") return Algo::Winograd4;
    throw py::value_error(std::string(fn) + ": algo must be 'direct', 'winograd' or 'winograd4', got '" + algo + "'");
}

// What every conv3x3 call takes: x (N, C, H, W), weight (K, C, 3, 3) and the algorithm, checked,
// and its optional arrays (None, or an array like x of a given shape).
struct ConvCall {
    const char* fn;
    Algo algo;
    py::array x, w;
    ConvDims d;

    // x_name: "x", or "grad_x" for conv3x3_grad_x, where the (N, C, H, W) array is the output
    ConvCall(const char* fn_, const py::object& x_obj, const py::object& w_obj, const std::string& algo_name,
             const char* x_name = "x")
        : fn(fn_),
          algo(parse_algo(fn_, algo_name)),
          x(as_float_array(fn_, x_name, x_obj, x_name[0] == 'g')),
          w(as_array_like(fn_, "weight", w_obj, x_name, x)),
          d(conv_dims(fn_, x, w)) {}
    // conv3x3_grad_weight: x and grad_y (N, K, H, W, into g) give the shapes; no weight (w stays empty)
    ConvCall(const char* fn_, const py::object& x_obj, const py::object& g_obj, const std::string& algo_name,
             py::array& g)
        : fn(fn_), algo(parse_algo(fn_, algo_name)), x(as_float_array(fn_, "x", x_obj)), d() {
        g = as_array_like(fn, "grad_y", g_obj, "x", x);
        if (x.ndim() != 4) throw py::value_error(std::string(fn) + ": x must be (N, C, H, W), got shape " + shape_str(x));
        if (g.ndim() != 4 || g.shape(0) != x.shape(0) || g.shape(2) != x.shape(2) || g.shape(3) != x.shape(3)) {
            throw py::value_error(std::string(fn) + ": grad_y must be (N, K, H, W) with the N, H, W of x " +
                                  shape_str(x) + ", got shape " + shape_str(g));
        }
        if (x.size() == 0 || g.shape(1) == 0) {
            throw py::value_error(std::string(fn) + ": x and grad_y must not be empty, got x " + shape_str(x) +
                                  ", grad_y " + shape_str(g));
        }
        d = {x.shape(0), x.shape(1), g.shape(1), x.shape(2), x.shape(3)};
    }
    std::vector<py::ssize_t> y_shape() const { return {d.N, d.K, d.H, d.W}; }
    std::vector<py::ssize_t> w_shape() const { return {d.K, d.C, 3, 3}; }

    // `name`, an array like x of this shape (writeable where `out`).
    py::array array(const char* name, const py::object& obj, bool out, const std::vector<py::ssize_t>& shape) const {
        py::array a = as_array_like(fn, name, obj, "x", x, out);
        require_shape(fn, name, a, shape);
        return a;
    }
    // The same, or absent (false) where obj is None.
    bool optional(const char* name, const py::object& obj, bool out, const std::vector<py::ssize_t>& shape,
                  py::array& a) const {
        if (obj.is_none()) return false;
        a = array(name, obj, out, shape);
        return true;
    }
};

template <typename T>
const T* data_or_null(bool has, const py::array& a) { return has ? data_of<T>(a) : nullptr; }
template <typename T>
T* mutable_data_or_null(bool has, py::array& a) { return has ? mutable_data_of<T>(a) : nullptr; }

// The outputs of a backward call: grad_x, grad_weight, grad_bias, each None (not computed) or
// an array to overwrite.
struct ConvGrads {
    py::array gx, gw, gb;
    bool want_x = false, want_w = false, want_b = false;

    ConvGrads(const ConvCall& c, const py::object& gw_obj, const py::object& gb_obj) {
        want_w = c.optional("grad_weight", gw_obj, true, c.w_shape(), gw);
        want_b = c.optional("grad_bias", gb_obj, true, {c.d.K}, gb);
    }
    ConvGrads(const ConvCall& c, const py::object& gx_obj, const py::object& gw_obj, const py::object& gb_obj)
        : ConvGrads(c, gw_obj, gb_obj) {
        want_x = c.optional("grad_x", gx_obj, true, pycnn::shape_of(c.x), gx);
    }

    // The conv gradients of c's algorithm on raw pointers (taken here, with the GIL held):
    // backward(gy), gy the gradient of the conv's output, runs without the GIL.
    template <typename T>
    auto backward(const ConvCall& c) {
        const T* xp = data_of<T>(c.x);
        const T* wp = data_or_null<T>(want_x, c.w);  // (conv3x3_grad_weight has none)
        T* gxp = mutable_data_or_null<T>(want_x, gx);
        T* gwp = mutable_data_or_null<T>(want_w, gw);
        T* gbp = mutable_data_or_null<T>(want_b, gb);
        return [=, algo = c.algo, d = c.d](const T* gy) {
            if (gxp) cv::grad_x<T>(algo, gy, wp, gxp, d.N, d.C, d.K, d.H, d.W);
            cv::grad_weight<T>(algo, xp, gy, gwp, gbp, d.N, d.C, d.K, d.H, d.W);
        };
    }
};

// The forward pass of c's algorithm (GIL released), with the epilogue ep.
template <typename T>
void run_forward(const ConvCall& c, bool has_bias, const py::array& b, py::array& y, const cv::Epilogue<T>& ep) {
    const T* xp = data_of<T>(c.x);
    const T* wp = data_of<T>(c.w);
    const T* bp = data_or_null<T>(has_bias, b);
    T* yp = mutable_data_of<T>(y);
    const ConvDims& d = c.d;
    py::gil_scoped_release nogil;
    cv::forward<T>(c.algo, xp, wp, bp, yp, d.N, d.C, d.K, d.H, d.W, ep);
}

// The prelu weight (K,): required for a per-channel activation (prelu), refused otherwise.
bool prelu_weight_arg(const ConvCall& c, const act::ConvActivation& a, const py::object& obj, py::array& out) {
    const bool has = c.optional("prelu_weight", obj, false, {c.d.K}, out);
    if (has != a.per_channel) {
        throw py::value_error(std::string(c.fn) + (has ? ": prelu_weight must be None unless activation is 'prelu'"
                                                       : ": activation 'prelu' needs prelu_weight of shape (K,)"));
    }
    return has;
}

void define(py::module_& m) {
    m.def(
        "conv3x3_forward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, const py::object& y_obj,
           const std::string& algo_name) {
            const ConvCall c("conv3x3_forward", x_obj, w_obj, algo_name);
            py::array b, y = c.array("y", y_obj, true, c.y_shape());
            const bool has_bias = c.optional("bias", b_obj, false, {c.d.K}, b);
            pycnn::dispatch_float(c.x, [&](auto zero) {
                using T = decltype(zero);
                run_forward<T>(c, has_bias, b, y, cv::Epilogue<T>());
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("algo") = "direct",
        "x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None -> y (N, K, H, W) (overwritten): 3x3 "
        "cross-correlation, stride 1, zero padding 1.  algo: 'direct', 'winograd' (F(2x2, 3x3)) or 'winograd4' "
        "(F(4x4, 3x3): fewer multiplies, float32 error about 5x the direct kernel's).");
    m.def(
        "conv3x3_grad_x",
        [](const py::object& g_obj, const py::object& w_obj, const py::object& gx_obj, const std::string& algo_name) {
            const ConvCall c("conv3x3_grad_x", gx_obj, w_obj, algo_name, "grad_x");
            const py::array g = c.array("grad_y", g_obj, false, c.y_shape());
            py::array gx = c.x;  // (checked writeable)
            pycnn::dispatch_float(gx, [&](auto zero) {
                using T = decltype(zero);
                const T* gp = data_of<T>(g);
                const T* wp = data_of<T>(c.w);
                T* gxp = mutable_data_of<T>(gx);
                const ConvDims& d = c.d;
                py::gil_scoped_release nogil;
                cv::grad_x<T>(c.algo, gp, wp, gxp, d.N, d.C, d.K, d.H, d.W);
            });
        },
        py::arg("grad_y"), py::arg("weight"), py::arg("grad_x"), py::arg("algo") = "direct",
        "grad_y (N, K, H, W), weight (K, C, 3, 3) -> grad_x (N, C, H, W) (overwritten): the gradient of "
        "conv3x3_forward with respect to x, a convolution with the flipped, transposed filter by the same "
        "algorithm ('winograd': F(2x2, 3x3), 'winograd4': F(4x4, 3x3)).");
    m.def(
        "conv3x3_grad_weight",
        [](const py::object& x_obj, const py::object& g_obj, const py::object& gw_obj, const py::object& gb_obj,
           const std::string& algo_name) {
            py::array g;
            const ConvCall c("conv3x3_grad_weight", x_obj, g_obj, algo_name, g);
            ConvGrads grads(c, gw_obj, gb_obj);
            pycnn::dispatch_float(c.x, [&](auto zero) {
                using T = decltype(zero);
                const T* gp = data_of<T>(g);
                const auto backward = grads.backward<T>(c);
                py::gil_scoped_release nogil;
                backward(gp);
            });
        },
        py::arg("x"), py::arg("grad_y"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("algo") = "direct",
        "x (N, C, H, W), grad_y (N, K, H, W) -> grad_weight (K, C, 3, 3) and grad_bias (K,), each None (not "
        "computed) or an array to overwrite: the gradients of conv3x3_forward with respect to its weight and "
        "bias.  algo 'winograd4' computes grad_weight by F(4x4, 3x3) (the adjoint of its forward), 'direct' and "
        "'winograd' directly.");
    m.def(
        "conv3x3_act_forward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& b_obj, const py::object& a_obj,
           const py::object& y_obj, const py::object& pre_obj, const std::string& activation, double slope,
           double alpha, const std::string& algo_name) {
            const ConvCall c("conv3x3_act_forward", x_obj, w_obj, algo_name);
            const act::ConvActivation& fns = act::conv_activation(c.fn, activation);
            py::array b, a, pre, y = c.array("y", y_obj, true, c.y_shape());
            const bool has_bias = c.optional("bias", b_obj, false, {c.d.K}, b);
            const bool has_prelu = prelu_weight_arg(c, fns, a_obj, a);
            const bool keep_pre = c.optional("pre", pre_obj, true, c.y_shape(), pre);
            pycnn::dispatch_float(c.x, [&](auto zero) {
                using T = decltype(zero);
                cv::Epilogue<T> ep;
                ep.activation = fns.forward<T>();
                ep.params = act::make_params<T>(slope, alpha, data_or_null<T>(has_prelu, a), c.d.K);
                ep.pre = mutable_data_or_null<T>(keep_pre, pre);
                run_forward<T>(c, has_bias, b, y, ep);
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"), py::arg("y"), py::arg("pre"),
        py::arg("activation"), py::arg("slope") = 0.01, py::arg("alpha") = 1.0, py::arg("algo") = "direct",
        "y = act(conv3x3(x, weight) + bias) in one pass (y overwritten).  activation: 'relu', 'leaky_relu' "
        "(slope), 'prelu' (prelu_weight (K,)), 'elu' (alpha) or another conv activation of activation.hpp; "
        "prelu_weight is None for the others.  "
        "pre: None or an array (N, K, H, W) that receives the pre-activation, for a backward pass that needs it "
        "(the caller decides: pycnn/ops/conv.py, grad_from_output).");
    m.def(
        "conv3x3_act_backward",
        [](const py::object& x_obj, const py::object& w_obj, const py::object& a_obj, const py::object& s_obj,
           bool saved_is_pre, const py::object& g_obj, const py::object& gx_obj, const py::object& gw_obj,
           const py::object& gb_obj, const py::object& ga_obj, const std::string& activation, double slope,
           double alpha, const std::string& algo_name) {
            const ConvCall c("conv3x3_act_backward", x_obj, w_obj, algo_name);
            const char* fn = c.fn;
            const act::ConvActivation& fns = act::conv_activation(fn, activation);
            const py::array saved = c.array("saved", s_obj, false, c.y_shape());
            const py::array g = c.array("grad_y", g_obj, false, c.y_shape());
            py::array a, ga;
            const bool has_prelu = prelu_weight_arg(c, fns, a_obj, a);
            ConvGrads grads(c, gx_obj, gw_obj, gb_obj);
            const bool want_a = c.optional("grad_prelu_weight", ga_obj, true, {c.d.K}, ga);
            if (want_a && !has_prelu) {
                throw py::value_error(std::string(fn) + ": grad_prelu_weight must be None unless activation is 'prelu'");
            }
            pycnn::dispatch_float(c.x, [&](auto zero) {
                using T = decltype(zero);
                const act::Params<T> params = act::make_params<T>(slope, alpha, data_or_null<T>(has_prelu, a), c.d.K);
                const T* sp = data_of<T>(saved);
                const T* gp = data_of<T>(g);
                T* gap = mutable_data_or_null<T>(want_a, ga);
                const auto backward = grads.backward<T>(c);
                const ConvDims& d = c.d;
                py::gil_scoped_release nogil;
                const int64_t P = d.H * d.W;
                // gz: the gradient of the pre-activation (N, K, H, W), read by all three conv gradients
                std::unique_ptr<T[]> gz(new T[static_cast<size_t>(d.N * d.K * P)]);
                act::rows_backward<T>(fns.backward<T>(), sp, gp, gz.get(), gap, !saved_is_pre, d.N, d.K, P, params);
                backward(gz.get());
            });
        },
        py::arg("x"), py::arg("weight"), py::arg("prelu_weight"), py::arg("saved"), py::arg("saved_is_pre"),
        py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("grad_prelu_weight"), py::arg("activation"), py::arg("slope") = 0.01, py::arg("alpha") = 1.0,
        py::arg("algo") = "direct",
        "Gradients of conv3x3_act_forward, in one pass: the gradient of the pre-activation is computed once "
        "and feeds every other.  saved is the output y (saved_is_pre=False) or the pre-activation "
        "(saved_is_pre=True); the caller decides which the activation's gradient needs (pycnn/ops/conv.py, "
        "grad_from_output: y only where it determines the gradient).  Each gradient is None (not computed) or an "
        "array to overwrite.");
}

const pycnn::Bindings bindings(define);

}  // namespace
