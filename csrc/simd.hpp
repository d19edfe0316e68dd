// The vector instruction sets of the float32 conv micro-kernels (conv3x3.cpp,
// conv3x3_winograd.cpp), behind one interface so that the same kernel code compiles for
// each build variant (CMakeLists.txt):
//   Avx512  16 lanes, 32 zmm registers, __mmask16 lane masks        (-mavx512f ..., _C_avx512)
//   Avx2     8 lanes, 16 ymm registers, vector lane masks (vmaskmov) (-mavx2 -mfma, _C_avx2)
// `Isa` is the best one this translation unit is compiled for; PYCNN_SIMD is 0 where there is
// none (the generic build: plain loops).  Each struct also fixes the register blocking of
// the kernels, sized to its register file.
//
// Masked loads never touch masked-off lanes (AVX-512 fault suppression; VMASKMOVPS: "faults
// will not occur due to referencing any memory location if the corresponding mask bit ... is
// 0"), so a masked load may start before or run past the end of an array; the address is
// formed with integer arithmetic (load_masked) to keep the C++ pointer rules out of it.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace pycnn {
namespace simd {

#if defined(__AVX512F__)
struct Avx512 {
    static constexpr int kLanes = 16;
    using Reg = __m512;
    using Mask = __mmask16;
    // register blocking (accumulators, of 32 registers)
    static constexpr int kFwdKB = 6, kFwdNV = 4;          // forward: 6 channels x 4 vectors = 24
    static constexpr int kFwdSmallKB = 3, kFwdSmallNV = 8;  // forward, K <= 3: 3 x 8 = 24
    static constexpr int kGradKB = 3;                      // grad_weight, few channels: 3 x 9 taps = 27
    static constexpr int kClVecs = 4;                      // grad_weight channels-last: 6 x 4 = 24
    static constexpr int kWinoVecs = 4;                    // Winograd GEMM: 6 x 4 = 24

    static Reg zero() { return _mm512_setzero_ps(); }
    static Reg set1(float v) { return _mm512_set1_ps(v); }
    static Reg loadu(const float* p) { return _mm512_loadu_ps(p); }
    static void storeu(float* p, Reg v) { _mm512_storeu_ps(p, v); }
    static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
    static Mask mask_from_bits(std::uint32_t bits) { return static_cast<Mask>(bits); }
    static Mask no_lanes() { return 0; }
    static Reg maskz_loadu(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
    static void mask_storeu(float* p, Mask m, Reg v) { _mm512_mask_storeu_ps(p, m, v); }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
    static constexpr int kLanes = 8;
    using Reg = __m256;
    struct Mask {  // lane l all ones where it is on (the form VMASKMOVPS takes)
        __m256i v;
    };
    // register blocking (accumulators, of 16 registers: loads and a broadcast need the rest)
    static constexpr int kFwdKB = 6, kFwdNV = 2;          // forward: 6 x 2 = 12
    static constexpr int kFwdSmallKB = 3, kFwdSmallNV = 4;  // forward, K <= 3: 3 x 4 = 12
    static constexpr int kGradKB = 1;                      // grad_weight, few channels: 1 x 9 taps = 9
    static constexpr int kClVecs = 2;                      // grad_weight channels-last: 6 x 2 = 12
    static constexpr int kWinoVecs = 2;                    // Winograd GEMM: 6 x 2 = 12

    static Reg zero() { return _mm256_setzero_ps(); }
    static Reg set1(float v) { return _mm256_set1_ps(v); }
    static Reg loadu(const float* p) { return _mm256_loadu_ps(p); }
    static void storeu(float* p, Reg v) { _mm256_storeu_ps(p, v); }
    static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
    static Mask mask_from_bits(std::uint32_t bits) {
        const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256i on = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit);
        return Mask{_mm256_cmpeq_epi32(on, lane_bit)};
    }
    static Mask no_lanes() { return Mask{_mm256_setzero_si256()}; }
    static Reg maskz_loadu(Mask m, const float* p) { return _mm256_maskload_ps(p, m.v); }
    static void mask_storeu(float* p, Mask m, Reg v) { _mm256_maskstore_ps(p, m.v, v); }
};
#endif

// PYCNN_AVX512: 1 where the hand-written AVX-512 paths (transposes, masks of simd.hpp and
// pool.cpp) are compiled in.
#if defined(__AVX512F__)
#define PYCNN_AVX512 1
#else
#define PYCNN_AVX512 0
#endif

#if defined(__AVX512F__)
using Isa = Avx512;
#define PYCNN_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
using Isa = Avx2;
#define PYCNN_SIMD 1
#else
#define PYCNN_SIMD 0
#endif

#if defined(__AVX512F__)
// r[i] = column i of the 16 x 16 matrix whose rows were r[0..15] (unpack, shuffle, 2 x shuffle_f32x4).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
    }
}

// Lanes 0 .. n - 1 on (all 16 for n >= 16).
inline __mmask16 first_lanes(std::int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1); }
#endif

#if PYCNN_SIMD
// V::kLanes floats from base + offset (in floats), masked-off lanes read as 0 and not touched.
template <class V>
inline typename V::Reg load_masked(typename V::Mask mask, const float* base, std::int64_t offset) {
    const float* p = reinterpret_cast<const float*>(reinterpret_cast<std::uintptr_t>(base) + offset * 4);
    return V::maskz_loadu(mask, p);
}

// The sum of the lanes, in lane order (once per result).
template <class V>
inline float hsum(typename V::Reg v) {
    alignas(64) float lanes[V::kLanes];
    V::storeu(lanes, v);
    float s = 0.0f;
    for (int l = 0; l < V::kLanes; ++l) s += lanes[l];
    return s;
}
#endif

}  // namespace simd
}  // namespace pycnn
