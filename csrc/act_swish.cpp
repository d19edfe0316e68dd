// swish (SiLU): y = x * sigmoid(x) -- forward and backward, float32 and float64, an
// elementwise map (swish_forward / swish_backward) and a conv3x3_act activation ("swish").
// Everything of swish in the C++ backend is in this file (activation.hpp makes the kernels,
// the bindings and the conv epilogue from the functor).
//
// With a = |x|, e = exp(-a) in (0, 1] (never overflows) and s = sigmoid(x):
//   x >= 0:  s = 1 / (1 + e),  y = x / (1 + e),       y' = s + x s (1 - s) = s (1 + a e s)
//   x <  0:  s = e / (1 + e),  y = -a e / (1 + e),    y' = s (1 - a / (1 + e))
// Products and quotients only, no cancellation but where y' itself crosses 0 (x = -1.2785).
// For x << 0, y ~ x exp(x) is tiny: e is split as m * 2^k2 with m and 2^k2 normal numbers, the
// product a m / (1 + e) is formed first and scaled by 2^k2 last, so that a result in the
// subnormal range is rounded once (from exp(-a) rounded to a subnormal first, y(-100) in
// float32 would be off by 2%).  Limits: y -> x, y' -> 1 as x -> +inf; y, y' -> 0 (as x exp(x))
// as x -> -inf, y(-inf) = -0 and y'(+-inf) = 1, 0 exactly; NaN propagates.
// The gradient needs the pre-activation x: y is not monotonic (two x give each y in
// (-0.28, 0)), so conv3x3_act keeps z for swish.
#include "activation.hpp"
#include "vecmath.hpp"

#include <cmath>

namespace {

using pycnn::ExpConst;
using pycnn::act::Params;

// Beyond this a, a * exp(-a) rounds to 0 in T (a exp(-a) < 2^-150 in float32, 2^-1075 in
// double), and 2^k1, 2^k2 below stay normal numbers.
template <typename T>
constexpr T kLargeA = sizeof(T) == 4 ? T(120) : T(760);

// e = exp(-a) = m * 2^k2 for a in [0, kLargeA] (or NaN): m = 2^k1 (1 + expm1(r)), k1 = k / 2,
// k2 = k - k1 (vecmath.hpp's split x = k ln2 + r).
template <typename T>
inline void exp_neg_split(T a, T& m, T& p2) {
    typename ExpConst<T>::Int k;
    T em;
    pycnn::exp_split<T>(-a, k, em);
    const auto k1 = k / 2;
    const T s1 = pycnn::pow2<T>(k1);
    m = std::fma(s1, em, s1);
    p2 = pycnn::pow2<T>(k - k1);
}

struct Swish : pycnn::act::Functor {
    static constexpr const char* kName = "swish";
    template <typename T>
    static T forward(T x, const Params<T>&) {
        T a = std::fabs(x);
        a = a > kLargeA<T> ? kLargeA<T> : a;  // NaN stays NaN; -inf gives -0 below
        T m, p2;
        exp_neg_split(a, m, p2);
        const T d = T(1) + m * p2;  // 1 + e
        const T neg = -((a * m) / d) * p2;
        return x >= T(0) ? x / d : neg;
    }
    // g * swish'(x), x the saved pre-activation
    template <typename T>
    static T backward(T x, T g, const Params<T>&) {
        T a = std::fabs(x);
        a = a > kLargeA<T> ? kLargeA<T> : a;
        T m, p2;
        exp_neg_split(a, m, p2);
        const T e = m * p2;
        const T d = T(1) + e;
        const T s = T(1) / d;                         // sigmoid(|x|)
        const T pos = s * (T(1) + a * e * s);         // x >= 0
        const T neg = ((m / d) * (T(1) - a / d)) * p2;  // x < 0: e / (1 + e) * (1 - a / (1 + e))
        return g * (x >= T(0) ? pos : neg);
    }
};

const pycnn::act::ConvRegistrar<Swish> swish_conv;

void define(py::module_& m) {
    pycnn::act::def_map<Swish>(m, "out = x * sigmoid(x) (SiLU; finite for every finite x).",
                               "x is the forward input: grad_in = grad_out * (s + x * s * (1 - s)), s = sigmoid(x).");
}

const pycnn::Bindings bindings(define);

}  // namespace
