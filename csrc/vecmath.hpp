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
// Within ~2 ulp of NumPy's expm1 / exp on x <= 0 (bench and tests check rtol 2e-5 / 1e-10).

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
    static constexpr float kExpMin = -87.68f;  // below -126.5 ln2 (exp < 2^-126.5, subnormal): flushed to 0
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
    static constexpr double kExpMin = -708.7;  // below -1022.5 ln2 (exp < 2^-1022.5, subnormal): flushed to 0
};

// x (in [kExpMin, 0], or NaN) -> scale = 2^k and em = expm1(r): exp(x) = scale * (1 + em).
template <typename T>
inline void exp_split(T x, T& scale, T& em) {
    using K = ExpConst<T>;
    const T kd = std::fma(x, K::kLog2e, K::kShifter) - K::kShifter;  // round(x / ln2)
    T r = std::fma(-kd, K::kLn2Hi, x);
    r = std::fma(-kd, K::kLn2Lo, r);
    T p = static_cast<T>(kInvFactorial[K::kTerms]);
#pragma GCC unroll 16  // straight-line code, so that the enclosing loop vectorises
    for (int n = K::kTerms - 1; n >= 2; --n) p = std::fma(p, r, static_cast<T>(kInvFactorial[n]));
    em = std::fma(r * r, p, r);
    const auto bits = static_cast<typename K::UInt>(static_cast<typename K::Int>(kd) + K::kBias) << K::kMantissaBits;
    std::memcpy(&scale, &bits, sizeof scale);
}

// expm1(x) for x <= 0 (NaN propagates).
template <typename T>
inline T expm1_nonpositive(T x) {
    x = x < ExpConst<T>::kExpm1Min ? ExpConst<T>::kExpm1Min : x;
    T scale, em;
    exp_split(x, scale, em);
    return std::fma(scale, em, scale - T(1));
}

// exp(x) for x <= 0 (NaN propagates; subnormal results are flushed to 0).
template <typename T>
inline T exp_nonpositive(T x) {
    const bool tiny = x < ExpConst<T>::kExpMin;
    x = tiny ? ExpConst<T>::kExpMin : x;
    T scale, em;
    exp_split(x, scale, em);
    return tiny ? T(0) : std::fma(scale, em, scale);
}

}  // namespace pycnn
