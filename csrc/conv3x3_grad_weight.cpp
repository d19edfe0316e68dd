// conv3x3 grad_weight, direct: gw[k, c, t] = sum over n, p of gy[n, k, p] * x[n, c, p + off(t)]
// (conv3x3.hpp has the shapes; the NumPy reference in pycnn/ops/conv.py is the spec).
//
// float32 (AVX-512, or AVX2 + FMA in the baseline build: simd.hpp):
//   C >= 16: the batch goes in chunks of images; per chunk, x is transposed to
//   zero-padded channels-last planes and gy packed per block of KB output channels, then a
//   block of KB output x NV vectors of input channels (KB x NV <= 24 zmm: 6 x 4, 8 x 3,
//   12 x 2; KB chosen per call for the least padded work x rounds of items per thread)
//   accumulates, for one tap, gy[k, p] (broadcast) times the channels of x at the tapped
//   pixel: KB broadcasts + NV loads per KB * NV FMAs, no masks, no horizontal sums.
//   C < 16 (a first layer): x is copied to three column-shifted zero-padded planes, gy is
//   read in place; 3 output channels x 9 taps = 27 accumulators for one input channel,
//   vectorised over pixels with plain loads, summed horizontally once at the end.  Work items
//   (k blocks; x c blocks for C >= 16) own their accumulators and outputs: nothing is merged, every sum runs
//   over the images and pixels in order, the result depends neither on the thread count nor
//   on the schedule (and the channels-last result not on the vector width either).
// float64 (and float32 in the generic build): plain loops, for gradient checks.
#include "kernel_base.hpp"
#include "conv3x3.hpp"
#include "channels_last.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.hpp"

namespace pycnn {
namespace conv {

namespace {

template <typename T>
void grad_weight_plain(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W) {
    const int64_t P = H * W;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < C; ++c) {
            for (int t = 0; t < 9; ++t) {
                const int i = t / 3, j = t % 3;
                T acc = T(0);
                for (int64_t n = 0; n < N; ++n) {
                    const T* xp = x + (n * C + c) * P;
                    const T* gp = gy + (n * K + k) * P;
                    for (int64_t h = 0; h < H; ++h) {
                        const int64_t hi = h + i - 1;
                        if (hi < 0 || hi >= H) continue;
                        const int64_t lo = std::max<int64_t>(0, 1 - j), hi_w = std::min<int64_t>(W, W + 1 - j);
                        for (int64_t ww = lo; ww < hi_w; ++ww) acc += gp[h * W + ww] * xp[hi * W + ww + j - 1];
                    }
                }
                gw[(k * C + c) * 9 + t] = acc;
            }
        }
    }
}

#if PYCNN_SIMD

// --------------------------------------------- grad_weight, channels-last (C >= 16)
// x is first transposed to zero-padded channels-last planes xt[n][(H+2)*(W+2)][Cp] (Cp = C
// rounded up to 16); then for a block of 6 output channels and CB = V::kClVecs vectors of
// input channels (64 with AVX-512, 16 with AVX2) and one tap t = (i, j):
//   acc[r][c..c+CB-1] += gy[n, k0+r, h, w] * xt[n][(h+i)*(W+2) + w+j][c..c+CB-1]
// over every pixel: 6 broadcasts + kClVecs loads per 6 * kClVecs FMAs, no masks, no
// horizontal sums.
constexpr int64_t kGradWeightChannelsLastMinC = 16;  // below: the pixel-vectorised kernel

// xt[n] (padded channels-last) from x[n] (C, H, W): borders and channels past C are zero.
#if PYCNN_AVX512
using simd::first_lanes;
using simd::transpose16;
#endif

void to_padded_channels_last(const float* x, float* xt, int64_t C, int64_t Cp, int64_t H, int64_t W) {
    const int64_t Wp = W + 2;
    std::memset(xt, 0, sizeof(float) * Wp * Cp);                    // top row
    std::memset(xt + (H + 1) * Wp * Cp, 0, sizeof(float) * Wp * Cp);  // bottom row
    for (int64_t h = 0; h < H; ++h) {
        float* row = xt + (h + 1) * Wp * Cp;
        std::memset(row, 0, sizeof(float) * Cp);                 // left column
        std::memset(row + (W + 1) * Cp, 0, sizeof(float) * Cp);  // right column
        row_to_channels_last(x + h * W, H * W, C, Cp, W, row, 1);
    }
}

// Scratch arrays of the channels-last kernel (the padded planes, the packed gy), kept per
// calling thread between calls and grown when needed (up to about kChunkBytes, plus the
// accumulators): a fresh allocation of several MiB per call costs its page faults (a third
// of the time of a 32 x 32 layer).  64-byte aligned, so
// that the zmm loads of whole channel vectors do not straddle cache lines.
// The transposed data of one chunk of images: large enough for one chunk at batch 64 in the
// README net (17 MiB at C = 32, 32 x 32), as every chunk costs two barriers and a barrier on
// a loaded machine waits for a thread that lost its core.
constexpr int64_t kChunkBytes = int64_t(32) << 20;

float* scratch(std::vector<float>& buf, size_t n) {
    if (buf.size() < n + 16) buf.assign(n + 16, 0.0f);  // (never shrinks)
    const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
    return buf.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// gyb[kb][p][KB] (kb = 0 .. kblocks-1, block stride `kstride` floats) from one image of gy
// (K, P): the output channels of block kb interleaved per pixel, rows past K zero, so that
// the micro-kernel broadcasts its KB values from one pointer.
template <int KB>
void pack_grad_y(const float* gy, float* gyb, int64_t K, int64_t P, int64_t kstride) {
    const int64_t kblocks = (K + KB - 1) / KB;
#if PYCNN_AVX512
    static_assert(KB <= 16, "one 16 x 16 transposition per 16 pixels");
    const __mmask16 kbm = first_lanes(KB);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        float* out = gyb + kb * kstride;
        for (int64_t p0 = 0; p0 < P; p0 += 16) {
            const int64_t np = std::min<int64_t>(16, P - p0);
            const __mmask16 m = first_lanes(np);
            __m512 r[16];
            for (int i = 0; i < 16; ++i) {
                const int64_t k = kb * KB + i;
                r[i] = i < KB && k < K ? _mm512_maskz_loadu_ps(m, gy + k * P + p0) : _mm512_setzero_ps();
            }
            transpose16(r);
            for (int64_t i = 0; i < np; ++i) _mm512_mask_storeu_ps(out + (p0 + i) * KB, kbm, r[i]);
        }
    }
    return;
#endif
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        float* out = gyb + kb * kstride;
        for (int r = 0; r < KB; ++r) {
            const int64_t k = kb * KB + r;
            if (k < K) {
                const float* src = gy + k * P;
                for (int64_t p = 0; p < P; ++p) out[p * KB + r] = src[p];
            } else {
                for (int64_t p = 0; p < P; ++p) out[p * KB + r] = 0.0f;
            }
        }
    }
}

// acc (KB x NV vectors, in memory, row stride NV vectors) += sum over images 0 .. nimg-1
// (strides gstride, xstride) and their H x W pixels of g[p * KB + r] (broadcast) times the
// padded channels-last plane xt shifted by `toff` floats.  Per pixel: NV loads, KB
// broadcasts, KB * NV FMAs (KB * NV <= 24 accumulators).
template <class V, int KB, int NV>
inline void grad_weight_cl_block(const float* g, int64_t gstride, const float* xt, int64_t xstride, int64_t nimg,
                                 int64_t toff, int64_t Cp, int64_t H, int64_t W, float* acc_mem) {
    using Reg = typename V::Reg;
    constexpr int L = V::kLanes;
    Reg acc[KB][NV];
    for (int r = 0; r < KB; ++r)
        for (int q = 0; q < NV; ++q) acc[r][q] = V::loadu(acc_mem + (r * NV + q) * L);
    const int64_t Wp = W + 2;
    for (int64_t n = 0; n < nimg; ++n) {
        for (int64_t h = 0; h < H; ++h) {
            const float* xr = xt + n * xstride + h * Wp * Cp + toff;
            const float* gr = g + n * gstride + h * W * KB;
            for (int64_t w = 0; w < W; ++w) {
                Reg xv[NV];
                for (int q = 0; q < NV; ++q) xv[q] = V::loadu(xr + w * Cp + L * q);
                for (int r = 0; r < KB; ++r) {
                    const Reg gb = V::set1(gr[w * KB + r]);
                    for (int q = 0; q < NV; ++q) acc[r][q] = V::fmadd(gb, xv[q], acc[r][q]);
                }
            }
        }
    }
    for (int r = 0; r < KB; ++r)
        for (int q = 0; q < NV; ++q) V::storeu(acc_mem + (r * NV + q) * L, acc[r][q]);
}

// One work item on one chunk of images: output channels of one k block (g: their packed gy,
// image stride P * KB), input channels c0 .. c0 + NV*L - 1 of the chunk's padded planes xt;
// every tap.  acc (9 x KB x NV*L floats, the item's own) += the chunk's sums.  The images go
// in sub-chunks whose planes (this block's channels) fit in L2; within one the accumulators of
// a tap stay in registers over all its images.
constexpr int64_t kClSubChunkBytes = 192 << 10;  // of L2 (1 MiB or more)

template <class V, int KB, int NV>
void grad_weight_cl_item(const float* g, const float* xt, int64_t nimg, int64_t Cp, int64_t H, int64_t W,
                         int64_t c0, float* acc) {
    constexpr int L = V::kLanes, CB = NV * L;
    const int64_t P = H * W, Pp = (H + 2) * (W + 2);
    const int64_t nb = std::max<int64_t>(1, kClSubChunkBytes / (Pp * CB * 4 + P * KB * 4));
    for (int64_t n0 = 0; n0 < nimg; n0 += nb) {
        const int64_t ni = std::min(nb, nimg - n0);
        const float* gn = g + n0 * P * KB;
        const float* xn = xt + n0 * Pp * Cp + c0;
        for (int t = 0; t < 9; ++t) {
            const int64_t toff = ((t / 3) * (W + 2) + t % 3) * Cp;
            grad_weight_cl_block<V, KB, NV>(gn, P * KB, xn, Pp * Cp, ni, toff, Cp, H, W, acc + t * KB * CB);
        }
    }
}

// The batch goes in chunks of images (whose padded planes and packed gy take up to
// kChunkBytes): the threads transpose a chunk's x to padded channels-last planes and pack its
// gy, then share its work items (k block, c block); each item adds to accumulators of its
// own, so every sum is taken over the images in order and the pixels in order whichever
// thread does an item: the result depends neither on the thread count nor on the schedule.
// Within a chunk, an item takes the images in sub-chunks that fit in L2.  Both loops are
// scheduled dynamically: on a machine shared with other processes a thread that loses its
// core holds up the other at the barrier by one image or item at most.
template <class V, int KB>
void grad_weight_cl_run(const float* x, const float* gy, float* gw, int64_t N, int64_t C, int64_t Cp, int64_t K,
                        int64_t H, int64_t W, int nvmax) {
    constexpr int L = V::kLanes;
    const int64_t P = H * W, Pp = (H + 2) * (W + 2);
    const int64_t kblocks = (K + KB - 1) / KB, cbw = nvmax * L, cblocks = (Cp + cbw - 1) / cbw;
    const int64_t items = kblocks * cblocks, item_acc = 9 * KB * cbw;
    const int64_t per_image = Pp * Cp + kblocks * KB * P;
    const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(1, kChunkBytes / (per_image * 4)));
    thread_local std::vector<float> xt_buf, gyb_buf, acc_buf;
    float* const xt = scratch(xt_buf, static_cast<size_t>(nb * Pp * Cp));
    float* const gyb = scratch(gyb_buf, static_cast<size_t>(kblocks * nb * P * KB));  // [kb][n][p][KB]
    float* const acc = scratch(acc_buf, static_cast<size_t>(items * item_acc));
    const int64_t kstride = nb * P * KB;
#pragma omp parallel
    {
        for (int64_t n0 = 0; n0 < N; n0 += nb) {
            const int64_t nimg = std::min(nb, N - n0);
#pragma omp for schedule(dynamic, 1)
            for (int64_t n = 0; n < nimg; ++n) {
                to_padded_channels_last(x + (n0 + n) * C * P, xt + n * Pp * Cp, C, Cp, H, W);
                pack_grad_y<KB>(gy + (n0 + n) * K * P, gyb + n * P * KB, K, P, kstride);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < items; ++item) {
                const int64_t kb = item / cblocks, c0 = (item % cblocks) * cbw;
                const int nv = static_cast<int>(std::min<int64_t>(nvmax, (Cp - c0) / L));
                const float* g = gyb + kb * kstride;
                float* a = acc + item * item_acc;
                if (n0 == 0) std::fill(a, a + item_acc, 0.0f);
                if constexpr (KB * 4 <= 24) {
                    if (nv == 4) grad_weight_cl_item<V, KB, 4>(g, xt, nimg, Cp, H, W, c0, a);
                }
                if constexpr (KB * 3 <= 24) {
                    if (nv == 3) grad_weight_cl_item<V, KB, 3>(g, xt, nimg, Cp, H, W, c0, a);
                }
                if constexpr (KB * 2 <= 24) {
                    if (nv == 2) grad_weight_cl_item<V, KB, 2>(g, xt, nimg, Cp, H, W, c0, a);
                }
                if (nv == 1) grad_weight_cl_item<V, KB, 1>(g, xt, nimg, Cp, H, W, c0, a);
                if (n0 + nimg < N) continue;
                // the last chunk: gw from acc ([t][r][c - c0], row stride nv * L)
                for (int r = 0; r < KB && kb * KB + r < K; ++r)
                    for (int64_t c = c0; c < std::min<int64_t>(C, c0 + cbw); ++c)
                        for (int t = 0; t < 9; ++t)
                            gw[((kb * KB + r) * C + c) * 9 + t] = a[(t * KB + r) * nv * L + (c - c0)];
            }
        }
    }
}

template <class V>
void grad_weight_channels_last(const float* x, const float* gy, float* gw, int64_t N, int64_t C, int64_t K,
                               int64_t H, int64_t W) {
    constexpr int L = V::kLanes;
    static_assert(16 % L == 0, "Cp (a multiple of 16) must be whole vectors");
    // accumulators KB x NV of the register file: 24 of 32 zmm, 12 of 16 ymm
    constexpr int kMaxAcc = L == 16 ? 24 : 12, kMaxNV = L == 16 ? 4 : 2;
    const int64_t Cp = (C + 15) / 16 * 16;
    const int nvmax = static_cast<int>(std::min<int64_t>(kMaxNV, Cp / L));
    const int64_t cblocks = (Cp + nvmax * L - 1) / (nvmax * L);
    const int64_t threads = omp_get_max_threads();
    // cost ~ rounds of items over the threads x cycles of an item per pixel and tap (KB * nv
    // FMAs + overhead)
    int best = 0;
    double best_cost = 0.0;
    for (int kb : {12, 8, 6, 4}) {
        if (kb * nvmax > kMaxAcc) continue;
        const int64_t items = (K + kb - 1) / kb * cblocks, rounds = (items + threads - 1) / threads;
        const double cost = static_cast<double>(rounds) * (kb * nvmax + 2.0);
        if (best == 0 || cost < best_cost) best = kb, best_cost = cost;
    }
    switch (best) {
        case 12: if constexpr (12 <= kMaxAcc) return grad_weight_cl_run<V, 12>(x, gy, gw, N, C, Cp, K, H, W, nvmax); break;
        case 8: return grad_weight_cl_run<V, 8>(x, gy, gw, N, C, Cp, K, H, W, nvmax);
        case 6: return grad_weight_cl_run<V, 6>(x, gy, gw, N, C, Cp, K, H, W, nvmax);
        default: break;
    }
    grad_weight_cl_run<V, 4>(x, gy, gw, N, C, Cp, K, H, W, nvmax);
}


// ------------------------------- grad_weight, pixel-vectorised (few input channels: C < 16)
// gy is read in place, as flat planes of P pixels, L pixels per vector.  x is first copied,
// per image and channel, to three column-shifted planes with a zero row above and below:
//   xs[j][(hh) * W + w] = x[hh-1, w+j-1]  (zero where w+j-1 or hh-1 falls outside the image),
// so that tap (i, j) of pixel q = h * W + w is xs[j][q + i * W]: plain loads (aligned when
// W is a multiple of L), no masks, no mask table.  Only the last vector of a gy plane, when P
// is not a multiple of L, is a masked load.  Per vector: KB loads of gy (V::kGradKB output
// channels: 3 with AVX-512, 1 with AVX2), 9 loads of x, 9 * KB FMAs.
// The batch goes in chunks of images whose shifted planes take up to kChunkBytes; the work
// items are the k blocks, which take every input channel in turn on a sub-chunk of images
// (whose gy planes stay in cache: gy, the larger array, is read from memory once) and own
// their accumulators (L lanes each): every sum runs over the images and pixels in order
// whichever thread takes an item, and is summed across lanes once at the end.
// am (KB x 9 vectors, in memory; zero where `fresh`) += sum over images 0 .. nimg-1 (strides
// xstride, gstride) and their vectors of gy[r] x tap t of the shifted planes; with `last`,
// am[r * 9 + t] receives the sums over the lanes instead.  (A function of its own: inside the
// OpenMP loop gcc 12 kept the accumulators in memory.)
template <class V>
void grad_weight_pixels_block(const float* x0, int64_t xstride, const float* g0, int64_t gstride, int64_t nimg,
                              int nk, int64_t P, int64_t W, int64_t nvec, int64_t Xs, typename V::Mask tail, bool fresh,
                              bool last, float* am) {
    using Reg = typename V::Reg;
    constexpr int L = V::kLanes, KB = V::kGradKB;
    Reg a[KB][9];
    for (int r = 0; r < KB; ++r)
        for (int t = 0; t < 9; ++t) a[r][t] = fresh ? V::zero() : V::loadu(am + (r * 9 + t) * L);
    const int64_t full = P % L == 0 ? nvec : nvec - 1;
    for (int64_t n = 0; n < nimg; ++n) {
        const float* xn = x0 + n * xstride;
        const float* gn = g0 + n * gstride;
        for (int64_t v = 0; v < nvec; ++v) {
            Reg g[KB];
            if (v < full) {
                for (int r = 0; r < KB; ++r) g[r] = r < nk ? V::loadu(gn + r * P + v * L) : V::zero();
            } else {
                for (int r = 0; r < KB; ++r) g[r] = r < nk ? V::maskz_loadu(tail, gn + r * P + v * L) : V::zero();
            }
            const float* xv0 = xn + v * L;
#pragma GCC unroll 9
            for (int t = 0; t < 9; ++t) {
                const Reg xv = V::loadu(xv0 + (t % 3) * Xs + (t / 3) * W);
                for (int r = 0; r < KB; ++r) a[r][t] = V::fmadd(g[r], xv, a[r][t]);
            }
        }
    }
    if (last) {
        for (int r = 0; r < KB; ++r)
            for (int t = 0; t < 9; ++t) am[r * 9 + t] = simd::hsum<V>(a[r][t]);
        return;
    }
    for (int r = 0; r < KB; ++r)
        for (int t = 0; t < 9; ++t) V::storeu(am + (r * 9 + t) * L, a[r][t]);
}

template <class V>
void grad_weight_pixels(const float* x, const float* gy, float* gw, int64_t N, int64_t C, int64_t K, int64_t H,
                        int64_t W) {
    constexpr int L = V::kLanes, KB = V::kGradKB;
    const int64_t P = H * W, nvec = (P + L - 1) / L;
    const int64_t Xs = (nvec * L + 2 * W + L - 1) / L * L;  // shifted plane stride (floats), read up to nvec*L + 2W
    const int64_t kblocks = (K + KB - 1) / KB;
    const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(1, kChunkBytes / (3 * C * Xs * 4)));
    // sub-chunks of images whose KB gy planes stay in L1/L2 while every channel c reads them
    const int64_t nsub = std::max<int64_t>(1, (int64_t(48) << 10) / (KB * P * 4));
    thread_local std::vector<float> xs_buf, acc_buf;
    float* const xs = scratch(xs_buf, static_cast<size_t>(nb * C * 3 * Xs));    // [n][c][j][Xs]
    float* const acc = scratch(acc_buf, static_cast<size_t>(kblocks * C * KB * 9 * L));  // [kb][c][r][t][lane]
    const typename V::Mask tail = V::mask_from_bits(P % L == 0 ? (1u << L) - 1 : (1u << (P % L)) - 1);
#pragma omp parallel
    {
        for (int64_t n0 = 0; n0 < N; n0 += nb) {
            const int64_t nimg = std::min(nb, N - n0);
#pragma omp for collapse(2) schedule(dynamic, 1)
            for (int64_t n = 0; n < nimg; ++n) {
                for (int64_t c = 0; c < C; ++c) {
                    const float* src = x + ((n0 + n) * C + c) * P;
                    for (int j = 0; j < 3; ++j) {
                        float* dst = xs + ((n * C + c) * 3 + j) * Xs;
                        std::fill(dst, dst + W, 0.0f);
                        for (int64_t h = 0; h < H; ++h) {
                            float* row = dst + (h + 1) * W;
                            const float* sr = src + h * W;
                            for (int64_t w = 0; w < W; ++w) {
                                const int64_t wi = w + j - 1;
                                row[w] = wi >= 0 && wi < W ? sr[wi] : 0.0f;
                            }
                        }
                        std::fill(dst + (H + 1) * W, dst + Xs, 0.0f);
                    }
                }
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t kb = 0; kb < kblocks; ++kb) {
                const int64_t k0 = kb * KB;
                const int nk = static_cast<int>(std::min<int64_t>(KB, K - k0));
                float* const ak = acc + kb * C * KB * 9 * L;
                for (int64_t s0 = 0; s0 < nimg; s0 += nsub) {
                    const int64_t s1 = std::min(nimg, s0 + nsub);
                    for (int64_t c = 0; c < C; ++c) {
                        float* am = ak + c * KB * 9 * L;
                        const bool last = n0 + nimg == N && s1 == nimg;
                        grad_weight_pixels_block<V>(xs + (s0 * C + c) * 3 * Xs, C * 3 * Xs, gy + ((n0 + s0) * K + k0) * P,
                                                    K * P, s1 - s0, nk, P, W, nvec, Xs, tail, n0 == 0 && s0 == 0, last, am);
                        if (!last) continue;
                        for (int r = 0; r < nk; ++r)  // the last images: am holds the sums
                            for (int t = 0; t < 9; ++t) gw[((k0 + r) * C + c) * 9 + t] = am[r * 9 + t];
                    }
                }
            }
        }
    }
}
#endif  // PYCNN_SIMD

}  // namespace

template <typename T>
void direct_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W) {
#if PYCNN_SIMD
    if constexpr (std::is_same_v<T, float>) {
        if (C >= kGradWeightChannelsLastMinC) return grad_weight_channels_last<simd::Isa>(x, gy, gw, N, C, K, H, W);
        return grad_weight_pixels<simd::Isa>(x, gy, gw, N, C, K, H, W);
    }
#endif
    grad_weight_plain(x, gy, gw, N, C, K, H, W);
}

PYCNN_CONV_INSTANTIATE(PYCNN_CONV_GRAD_WEIGHT_INSTANTIATE, direct_grad_weight)

}  // namespace conv
}  // namespace pycnn
