// Vectorisable exp / expm1 of the C++ backend, shared by the map kernels (activations.cpp:
// elu; maps.cpp: sigmoid, tanh).  Header-only and inline, so each loop that calls them is
// vectorised as a whole (std::exp does not vectorise without -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pycnn {

// ------------------------------------------------------------------- exp for x <= 0
// A vectorisable exp / expm1 in T (std::exp does not vectorise without -ffast-math):
// x = k*ln2 + r with |r| <= ln2/2 (Cody-Waite: k*ln2_hi is exact), expm1(r) by its Taylor
// series (truncation < 2^-24 relative for float with 7 terms, < 2^-56 for double with 13),
// then exp(x) = 2^k * (1 + expm1(r)).  Horner steps are explicit fused multiply-adds.
// float32, proven over every input x <= 0 by exhaustion (bench/exp_ulp.py, against float64
// NumPy): exp within 1.059 ulp, expm1 within 0.872 ulp of the exact value, subnormal results of
// exp included (2^k is applied as two normal factors 2^(k/2) 2^(k - k/2), so only the last
// product rounds to a subnormal: exp(-100) in float32 is 3.7e-44, not 0).

inline constexpr double kInvFactorial[] = {
    1.0, 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0, 1.0 / 40320.0,
    1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0, 1.0 / 6227020800.0, 1.0 / 87178291200.0};

template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
    using UInt = std::uint32_t;
    using Int = std::int32_t;
    static constexpr int kTerms = 7, kMantissaBits = 23, kBias = 127;
    static constexpr float kLog2e = 1.44269504088896341f;
    static constexpr float kLn2Hi = 0.693145751953125f;  // 16 significant bits
    static constexpr float kLn2Lo = 1.428606765330187045e-06f;
    static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    static constexpr float kExpm1Min = -40.0f;      // expm1 rounds to -1 below -17.4
    static constexpr float kExpMin = -104.0f;  // below -150 ln2 (exp < 2^-150, half the least subnormal): 0
};
template <>
struct ExpConst<double> {
    using UInt = std::uint64_t;
    using Int = std::int64_t;
    static constexpr int kTerms = 13, kMantissaBits = 52, kBias = 1023;
    static constexpr double kLog2e = 1.4426950408889634;
    static constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits
    static constexpr double kLn2Lo = 1.90821492927058770002e-10;
    static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
    static constexpr double kExpm1Min = -100.0;  // expm1 rounds to -1 below -37.5
    static constexpr double kExpMin = -745.2;  // below -1075 ln2 (exp < 2^-1075, half the least subnormal): 0
};

// 2^k for an integer k in [1 - kBias, 0]: a normal number, built from its exponent bits.
template <typename T>
inline T pow2(typename ExpConst<T>::Int k) {
    using K = ExpConst<T>;
    const auto bits = static_cast<typename K::UInt>(k + K::kBias) << K::kMantissaBits;
    T out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

// x (in [kExpMin, 0], or NaN) -> k and em = expm1(r): exp(x) = 2^k * (1 + em).
template <typename T>
inline void exp_split(T x, typename ExpConst<T>::Int& k, T& em) {
    using K = ExpConst<T>;
    const T kd = std::fma(x, K::kLog2e, K::kShifter) - K::kShifter;  // round(x / ln2)
    T r = std::fma(-kd, K::kLn2Hi, x);
    r = std::fma(-kd, K::kLn2Lo, r);
    T p = static_cast<T>(kInvFactorial[K::kTerms]);
#pragma GCC unroll 16  // straight-line code, so that the enclosing loop vectorises
    for (int n = K::kTerms - 1; n >= 2; --n) p = std::fma(p, r, static_cast<T>(kInvFactorial[n]));
    em = std::fma(r * r, p, r);
    k = static_cast<typename K::Int>(kd);
}

// expm1(x) for x <= 0 (NaN propagates).
template <typename T>
inline T expm1_nonpositive(T x) {
    x = x < ExpConst<T>::kExpm1Min ? ExpConst<T>::kExpm1Min : x;  // k >= -58 (float), -145 (double)
    typename ExpConst<T>::Int k;
    T em;
    exp_split(x, k, em);
    const T scale = pow2<T>(k);
    return std::fma(scale, em, scale - T(1));
}

// exp(x) for x <= 0 (NaN propagates; results below half the least subnormal are 0).
template <typename T>
inline T exp_nonpositive(T x) {
    const bool zero = x < ExpConst<T>::kExpMin;
    x = zero ? ExpConst<T>::kExpMin : x;
    typename ExpConst<T>::Int k;
    T em;
    exp_split(x, k, em);
    const auto k1 = k / 2;  // 2^k = 2^k1 * 2^(k - k1), both normal: only the last product can be subnormal
    const T scale = pow2<T>(k1);
    return zero ? T(0) : std::fma(scale, em, scale) * pow2<T>(k - k1);
}

}  // namespace pycnn
