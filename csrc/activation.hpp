// The activation idiom of the C++ backend: one activation = one functor, written once, from
// which this header makes
//   (a) the elementwise kernels  <name>_forward / <name>_backward  (flat maps, or rows of the
//       (N, C, S) view for a per-channel activation),
//   (b) their Python bindings (def_map: the checks of common.hpp, float32 and float64, GIL released),
//   (c) the fused epilogue of conv3x3_act (conv3x3.hpp: Epilogue), registered by name
//       (ConvRegistrar), so that the conv and the elementwise kernel run the same per-element code.
// An activation file (csrc/act_*.cpp) holds functors, a registrar per conv activation and one
// pycnn::Bindings object; CMakeLists.txt globs csrc/*.cpp and compiles csrc/act_*.cpp without
// fused multiply-adds (-ffp-contract=off, as the NumPy references round), so adding an
// activation is adding one file.
//
// A functor (derive from Functor, which gives the defaults):
//   static constexpr const char* kName;              the name of the bindings and of the conv activation
//   template <class T> static T forward(T z, const Params<T>& p);         y = act(z)
//   template <class T> static T backward(T s, T g, const Params<T>& p);   g * act'(z), s the saved array
//   static constexpr Scalar kScalar; kScalarDefault;  the one scalar parameter of the bindings, if any
//   `backward` reads s = z or s = y = act(z), whichever the caller saved: the rule of which
//   activations may keep y alone is pycnn/ops/conv.py's (grad_from_output), the one place.
//   static constexpr bool kPerChannel;  prelu: p.slope is the slope of the row's channel, and
//       template <class T> static double weight_grad(T s, T g);  its term of that slope's gradient
// forward and backward are inline and branch-free (selects), so the loops that call them vectorise.
#pragma once

#include "activation_kernels.hpp"
#include "common.hpp"

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace pycnn {
namespace act {

// ------------------------------------------------------------------------ bindings
// <name>_forward(x, out[, scalar]) and <name>_backward(x, grad_out, grad_in[, scalar]) of a
// flat activation; the scalar argument (A::kScalar) is named "slope" or "alpha".
template <class A>
void def_map(py::module_& m, const char* forward_doc, const char* backward_doc) {
    const std::string fwd = std::string(A::kName) + "_forward", bwd = std::string(A::kName) + "_backward";
    auto forward = [fwd](const py::object& x, const py::object& out, double v) {
        map_call(fwd.c_str(), "x", x, "out", out, [v](auto xp, auto op, int64_t n) {
            using T = element_t<decltype(xp)>;
            map_forward<A, T>(xp, op, n, scalar_params<A, T>(v));
        });
    };
    auto backward = [bwd](const py::object& x, const py::object& g, const py::object& gi, double v) {
        map_backward_call(bwd.c_str(), x, g, gi, [v](auto xp, auto gp, auto gip, int64_t n) {
            using T = element_t<decltype(xp)>;
            map_backward<A, T>(xp, gp, gip, n, scalar_params<A, T>(v));
        });
    };
    if constexpr (A::kScalar == Scalar::None) {
        m.def(
            fwd.c_str(), [forward](const py::object& x, const py::object& out) { forward(x, out, 0.0); },
            py::arg("x"), py::arg("out"), forward_doc);
        m.def(
            bwd.c_str(),
            [backward](const py::object& x, const py::object& g, const py::object& gi) { backward(x, g, gi, 0.0); },
            py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), backward_doc);
    } else {
        const char* scalar = A::kScalar == Scalar::Slope ? "slope" : "alpha";
        m.def(fwd.c_str(), forward, py::arg("x"), py::arg("out"), py::arg(scalar) = A::kScalarDefault, forward_doc);
        m.def(bwd.c_str(), backward, py::arg("x"), py::arg("grad_out"), py::arg("grad_in"),
              py::arg(scalar) = A::kScalarDefault, backward_doc);
    }
}

// ---------------------------------------------------------- conv3x3_act activations
// The activations conv3x3_act takes by name: the row functions of each dtype (a function
// pointer per stretch of outputs costs nothing next to the convolution).
struct ConvActivation {
    std::string name;
    bool per_channel;  // takes prelu_weight (K,)
    RowForward<float> forward_f32;
    RowForward<double> forward_f64;
    RowBackward<float> backward_f32;
    RowBackward<double> backward_f64;

    template <typename T>
    RowForward<T> forward() const {
        if constexpr (std::is_same_v<T, float>) return forward_f32; else return forward_f64;
    }
    template <typename T>
    RowBackward<T> backward() const {
        if constexpr (std::is_same_v<T, float>) return backward_f32; else return backward_f64;
    }
};

void add_conv_activation(ConvActivation a);  // activation.cpp

// `const ConvRegistrar<Relu> relu_conv;` in an activation file makes "relu" a conv3x3_act activation.
template <class A>
struct ConvRegistrar {
    ConvRegistrar() {
        add_conv_activation({A::kName, A::kPerChannel, &row_forward<A, float>, &row_forward<A, double>,
                             &row_backward<A, float>, &row_backward<A, double>});
    }
};

// The activation called `name`; ValueError "<fn>: activation must be one of 'elu', ... got '<name>'".
const ConvActivation& conv_activation(const char* fn, const std::string& name);

}  // namespace act
}  // namespace pycnn
