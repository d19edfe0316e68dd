// One image row of C channel planes -> channels-last pixels (Cp >= C channels each, the
// channels past C zero): the copy that the grad_weight kernels make before vectorising over
// channels (conv3x3_grad_weight.cpp: whole padded planes; conv3x3_winograd4_grad_weight.cpp:
// the rows of a tile row).  AVX-512: 16 pixels x 16 channels at a time, transposed in registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.hpp"

namespace pycnn {
namespace conv {

// dst[(w + offset) * Cp + c] = src[c * cstride + w] for w < W, c < C, and 0 for C <= c < Cp
// (channel planes cstride apart; Cp a multiple of 16).
template <typename T>
void row_to_channels_last(const T* src, std::int64_t cstride, std::int64_t C, std::int64_t Cp, std::int64_t W,
                          T* dst, std::int64_t offset) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
        for (std::int64_t w0 = 0; w0 < W; w0 += 16) {
            const std::int64_t nw = std::min<std::int64_t>(16, W - w0);
            const __mmask16 m = simd::first_lanes(nw);
            for (std::int64_t c0 = 0; c0 < Cp; c0 += 16) {
                __m512 r[16];
                for (int cc = 0; cc < 16; ++cc) {
                    const std::int64_t c = c0 + cc;
                    r[cc] = c < C ? _mm512_maskz_loadu_ps(m, src + c * cstride + w0) : _mm512_setzero_ps();
                }
                simd::transpose16(r);
                for (std::int64_t ww = 0; ww < nw; ++ww) _mm512_storeu_ps(dst + (w0 + ww + offset) * Cp + c0, r[ww]);
            }
        }
        return;
    }
#endif
    for (std::int64_t w = 0; w < W; ++w) {
        T* d = dst + (w + offset) * Cp;
        for (std::int64_t c = 0; c < C; ++c) d[c] = src[c * cstride + w];
        std::fill(d + C, d + Cp, T(0));
    }
}

}  // namespace conv
}  // namespace pycnn
