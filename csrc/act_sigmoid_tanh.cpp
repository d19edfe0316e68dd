// sigmoid and tanh -- forward and backward, float32 and float64, as functors of
// activation.hpp (elementwise maps; not conv3x3_act activations).  The NumPy references in
// pycnn/ops/activations.py are the spec.
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
#include "activation.hpp"
#include "vecmath.hpp"

#include <cmath>

namespace {

using pycnn::act::Params;

struct Sigmoid : pycnn::act::Functor {
    static constexpr const char* kName = "sigmoid";
    template <typename T>
    static T forward(T x, const Params<T>&) {
        const T e = pycnn::exp_nonpositive<T>(-std::fabs(x));  // NaN stays NaN
        const T s = T(1) / (T(1) + e);
        return x >= T(0) ? s : e * s;
    }
    // g * sigmoid'(x), x the saved input (the formula at the top)
    template <typename T>
    static T backward(T x, T g, const Params<T>&) {
        const T e = pycnn::exp_nonpositive<T>(-std::fabs(x));
        const T s = T(1) / (T(1) + e);
        return g * (e * s * s);
    }
};

struct Tanh : pycnn::act::Functor {
    static constexpr const char* kName = "tanh";
    template <typename T>
    static T forward(T x, const Params<T>&) {
        const T m = pycnn::expm1_nonpositive<T>(T(-2) * std::fabs(x));
        return std::copysign(-m / (T(2) + m), x);
    }
    // g * tanh'(x), x the saved input (the formula at the top)
    template <typename T>
    static T backward(T x, T g, const Params<T>&) {
        const T e = pycnn::exp_nonpositive<T>(T(-2) * std::fabs(x));
        const T s = T(1) / (T(1) + e);
        return g * (T(4) * e * s * s);
    }
};

void define(py::module_& m) {
    pycnn::act::def_map<Sigmoid>(m, "out = 1 / (1 + exp(-x)) (finite for every finite x).",
                                 "x is the forward input: grad_in = grad_out * sigmoid(x) * sigmoid(-x) = grad_out * "
                                 "e / (1 + e)^2, e = exp(-|x|).");
    pycnn::act::def_map<Tanh>(m, "out = tanh(x).",
                              "x is the forward input: grad_in = grad_out * (1 - tanh(x)^2) = grad_out * 4 e / "
                              "(1 + e)^2, e = exp(-2|x|).");
}

const pycnn::Bindings bindings(define);

}  // namespace
