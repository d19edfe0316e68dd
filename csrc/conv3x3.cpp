// conv3x3, stride 1, zero padding 1: direct convolution (forward, grad_bias; grad_x is the
// forward with the flipped filter, conv3x3.hpp; grad_weight is in conv3x3_grad_weight.cpp).
// The bindings of every algorithm are in conv3x3_bindings.cpp.
// The NumPy reference in pycnn/ops/conv.py is the spec.
//
// Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,), y is (N, K, H, W), P = H*W.
//
// float32, direct (AVX-512, or AVX2 + FMA in the baseline build: simd.hpp; the numbers below
// are AVX-512's, simd.hpp has the AVX2 blocking): each image plane is treated as a flat vector
// of P pixels.  A zmm register holds 16 consecutive pixels (which may span several rows when W < 16); tap
// (i, j) of the filter is the same plane shifted by (i-1)*W + (j-1), read with a *masked*
// load whose mask zeroes the lanes that fall into the zero padding (left/right column,
// top/bottom row) or past the end of the plane.  The masks depend on H and W only and are
// computed once per call (TapMasks).  No padded copy of x is made, any H and W vectorise
// fully (W = 8 too), and y is stored straight into NCHW.
//   forward micro-kernel: 6 output channels x 4 pixel vectors = 24 zmm accumulators; per
//   (input channel, tap): 4 masked loads of x, 6 broadcasts of weights, 24 FMAs (3 x 8 when
//   there are at most 3 output channels).  Threads split the (image, channel block) pairs.
//   grad_input: the same kernel with the filter flipped and transposed (K -> C channels).
//   grad_weight: conv3x3_grad_weight.cpp.
// float64 (and float32 in the generic build): plain loops, for gradient checks.
#include "kernel_base.hpp"
#include "conv3x3.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.hpp"

namespace pycnn {
namespace conv {

namespace {

// ------------------------------------------------------------------------- plain paths
// y[n, k] = b[k] + sum_{c, t} w[k, c, t] * x[n, c, shifted by t]    (any T)
template <typename T>
void forward_plain(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H,
                   int64_t W, const Epilogue<T>& ep) {
    const int64_t P = H * W;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k) {
            T* yp = y + (n * K + k) * P;
            const T bk = b ? b[k] : T(0);
            for (int64_t p = 0; p < P; ++p) yp[p] = bk;
            for (int64_t c = 0; c < C; ++c) {
                const T* xp = x + (n * C + c) * P;
                const T* wp = w + (k * C + c) * 9;
                for (int64_t h = 0; h < H; ++h) {
                    for (int i = 0; i < 3; ++i) {
                        const int64_t hi = h + i - 1;
                        if (hi < 0 || hi >= H) continue;
                        const T* xr = xp + hi * W;
                        T* yr = yp + h * W;
                        for (int j = 0; j < 3; ++j) {
                            const T wt = wp[3 * i + j];
                            const int64_t lo = std::max<int64_t>(0, 1 - j), hi_w = std::min<int64_t>(W, W + 1 - j);
                            for (int64_t ww = lo; ww < hi_w; ++ww) yr[ww] += wt * xr[ww + j - 1];
                        }
                    }
                }
            }
            if (ep.active()) ep.apply(yp, (n * K + k) * P, k, P);
        }
    }
}

#if PYCNN_SIMD
using simd::load_masked;

// ------------------------------------------------------------------------- tap masks
// For pixel vector v (pixels L*v .. L*v + L-1 of the flat plane, L = V::kLanes): mask[v][t]
// has lane l on where pixel L*v + l exists and its tap t lies inside the plane; mask[v][9]
// marks the pixels that exist.  Vectors past the plane (padding up to a multiple of `pad`)
// have all-off masks.
constexpr int kMaskStride = 10;

template <class V>
struct TapMasks {
    using Mask = typename V::Mask;
    static constexpr int L = V::kLanes;
    int64_t nvec = 0;              // ceil(P / L), rounded up to a multiple of `pad`
    std::vector<Mask> m;           // [nvec][kMaskStride]
    int64_t off[9];                // flat offset of tap t: (i-1)*W + (j-1)
    TapMasks(int64_t H, int64_t W, int64_t pad) {
        const int64_t P = H * W;
        nvec = (P + L - 1) / L;
        nvec = (nvec + pad - 1) / pad * pad;
        std::vector<uint32_t> bits(static_cast<size_t>(nvec * kMaskStride), 0);
        for (int t = 0; t < 9; ++t) off[t] = (t / 3 - 1) * W + (t % 3 - 1);
        for (int64_t p = 0; p < P; ++p) {
            const int64_t h = p / W, w = p % W, v = p / L;
            const uint32_t lane = 1u << static_cast<int>(p % L);
            uint32_t* mv = &bits[static_cast<size_t>(v * kMaskStride)];
            mv[9] |= lane;
            for (int t = 0; t < 9; ++t) {
                const int64_t hi = h + t / 3 - 1, wi = w + t % 3 - 1;
                if (hi >= 0 && hi < H && wi >= 0 && wi < W) mv[t] |= lane;
            }
        }
        m.reserve(bits.size());
        for (uint32_t b : bits) m.push_back(V::mask_from_bits(b));
    }
    const Mask* at(int64_t v) const { return &m[static_cast<size_t>(v * kMaskStride)]; }
};

// ------------------------------------------------------------- forward micro-kernel
// Blocks of KB output channels x NV pixel vectors (V::kFwdKB x V::kFwdNV accumulators: 6 x 4
// zmm, 6 x 2 ymm), and V::kFwdSmallKB x V::kFwdSmallNV for at most 3 output channels
// (grad_input of a first layer, C = 3).
constexpr int kPixelPad = 8;  // the mask table is padded to a multiple of every NV

// Packed filter of one block of KB output channels: wp[c][t][kb] (zero rows past K).
template <int KB>
std::vector<float> pack_forward_weights(const float* w, int64_t C, int64_t K) {
    const int64_t kblocks = (K + KB - 1) / KB;
    std::vector<float> wp(static_cast<size_t>(kblocks * C * 9 * KB));
    for (int64_t kb = 0; kb < kblocks; ++kb)
        for (int64_t c = 0; c < C; ++c)
            for (int t = 0; t < 9; ++t)
                for (int r = 0; r < KB; ++r) {
                    const int64_t k = kb * KB + r;
                    wp[static_cast<size_t>(((kb * C + c) * 9 + t) * KB + r)] = k < K ? w[(k * C + c) * 9 + t] : 0.0f;
                }
    return wp;
}

// y[k0 + r, pixels of vectors v0 .. v0+NV-1] for r < nk; x is one image (C, P), y one image (K, P).
template <class V, int KB, int NV>
inline void forward_block(const float* x, const float* wp, const float* b, float* y, int nk, int64_t C, int64_t P,
                          const TapMasks<V>& tm, int64_t v0) {
    using Reg = typename V::Reg;
    constexpr int L = V::kLanes;
    Reg acc[KB][NV];
    for (int r = 0; r < KB; ++r) {
        const Reg init = V::set1(b && r < nk ? b[r] : 0.0f);
        for (int v = 0; v < NV; ++v) acc[r][v] = init;
    }
    const typename V::Mask* mk[NV];
    for (int v = 0; v < NV; ++v) mk[v] = tm.at(v0 + v);
    const float* xbase = x + v0 * L;
    for (int64_t c = 0; c < C; ++c) {
        const float* xc = xbase + c * P;
        const float* wc = wp + c * 9 * KB;
#pragma GCC unroll 9
        for (int t = 0; t < 9; ++t) {
            Reg xv[NV];
            for (int v = 0; v < NV; ++v) xv[v] = load_masked<V>(mk[v][t], xc + L * v, tm.off[t]);
            for (int r = 0; r < KB; ++r) {
                const Reg wr = V::set1(wc[t * KB + r]);
                for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(wr, xv[v], acc[r][v]);
            }
        }
    }
    for (int r = 0; r < nk; ++r)
        for (int v = 0; v < NV; ++v) V::mask_storeu(y + r * P + (v0 + v) * L, mk[v][9], acc[r][v]);
}

template <class V, int KB, int NV>
void forward_blocked(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t C, int64_t K,
                     int64_t H, int64_t W, const Epilogue<float>& ep) {
    constexpr int L = V::kLanes;
    const int64_t P = H * W;
    const TapMasks<V> tm(H, W, kPixelPad);
    const int64_t kblocks = (K + KB - 1) / KB;
    const std::vector<float> wpack = pack_forward_weights<KB>(w, C, K);
    const float* wp = wpack.data();
    const int64_t nvec = (P + L - 1) / L;  // vectors past it are all-masked: stores skip them
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t kb = 0; kb < kblocks; ++kb) {
            const int nk = static_cast<int>(std::min<int64_t>(KB, K - kb * KB));
            const float* xn = x + n * C * P;
            float* yn = y + (n * K + kb * KB) * P;
            const float* bb = b ? b + kb * KB : nullptr;
            for (int64_t v0 = 0; v0 < nvec; v0 += NV) {
                forward_block<V, KB, NV>(xn, wp + kb * C * 9 * KB, bb, yn, nk, C, P, tm, v0);
                if (!ep.active()) continue;
                // the epilogue on the pixels just stored (nk x up to L * NV floats, in L1)
                const int64_t p0 = v0 * L, np = std::min<int64_t>(P, (v0 + NV) * L) - p0;
                for (int r = 0; r < nk; ++r) {
                    const int64_t k = kb * KB + r;
                    ep.apply(yn + r * P + p0, (n * K + k) * P + p0, k, np);
                }
            }
        }
    }
}

template <class V>
void forward_simd(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t C, int64_t K,
                  int64_t H, int64_t W, const Epilogue<float>& ep) {
    if (K <= 3) return forward_blocked<V, V::kFwdSmallKB, V::kFwdSmallNV>(x, w, b, y, N, C, K, H, W, ep);
    forward_blocked<V, V::kFwdKB, V::kFwdNV>(x, w, b, y, N, C, K, H, W, ep);
}

#endif  // PYCNN_SIMD

}  // namespace

// --------------------------------------------------------------------- entry points
template <typename T>
void direct_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H,
                    int64_t W, const Epilogue<T>& ep) {
#if PYCNN_SIMD
    if constexpr (std::is_same_v<T, float>) return forward_simd<simd::Isa>(x, w, b, y, N, C, K, H, W, ep);
#endif
    forward_plain(x, w, b, y, N, C, K, H, W, ep);
}

// gb[k] = sum over n, p of gy[n, k, p], summed in double per (n, k) row, rows added in order of n.
template <typename T>
void grad_bias(const T* gy, T* gb, int64_t N, int64_t K, int64_t P) {
#pragma omp parallel for schedule(static) if (N * K * P >= kParallelMinElements)
    for (int64_t k = 0; k < K; ++k) {
        double total = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const T* g = gy + (n * K + k) * P;
            double acc = 0.0;
#pragma omp simd reduction(+ : acc)
            for (int64_t p = 0; p < P; ++p) acc += static_cast<double>(g[p]);
            total += acc;
        }
        gb[k] = static_cast<T>(total);
    }
}

PYCNN_CONV_INSTANTIATE(PYCNN_CONV_FORWARD_INSTANTIATE, direct_forward)
template void grad_bias<float>(const float*, float*, int64_t, int64_t, int64_t);
template void grad_bias<double>(const double*, double*, int64_t, int64_t, int64_t);

}  // namespace conv
}  // namespace pycnn
