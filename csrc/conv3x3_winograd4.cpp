// conv3x3 by Winograd F(4x4, 3x3) (Lavin & Gray 2015): forward, and grad_input as a Winograd
// convolution with the flipped, transposed filter.  grad_weight, the adjoint of the forward, is
// in conv3x3_winograd4_grad_weight.cpp.  The F(2x2, 3x3) kernels are in conv3x3_winograd.cpp.
//
// Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), y is (N, K, H, W).  The output is cut
// into 4x4 tiles (th = ceil(H/4) by tw = ceil(W/4) per image); tile (ty, tx) reads the 6x6
// input patch at rows 4ty-1 .. 4ty+4, columns 4tx-1 .. 4tx+4 (zero outside).
//   U[xi][k][c] = (G g G^T)[xi]      filter transform, once per call     (36 x K x C)
//   V[c][xi][j] = (B^T d B)[xi]      input transform of tile j           (C x 36 x tiles)
//   M[k][xi][j] = sum_c U[xi][k][c] V[c][xi][j]                          36 GEMMs
//   y tile      = A^T M A                                                (+ bias, epilogue)
// with the points 0, 1, -1, 2, -2 and infinity (Lavin & Gray's matrices; checked against a
// float64 direct convolution: equal to 4e-14):
//   B^T = [4  0 -5  0  1  0]   G = [ 1/4     0     0]   A^T = [1  1  1  1  1  0]
//         [0 -4 -4  1  1  0]       [-1/6  -1/6  -1/6]         [0  1 -1  2 -2  0]
//         [0  4 -4 -1  1  0]       [-1/6   1/6  -1/6]         [0  1  1  4  4  0]
//         [0 -2 -1  2  1  0]       [1/24  1/12   1/6]         [0  1 -1  8 -8  1]
//         [0  2 -1 -2  1  0]       [1/24 -1/12   1/6]
//         [0  4  0 -5  0  1]       [   0     0     1]
// 36 multiplies per 4x4 outputs and channel instead of 144 (F(2x2, 3x3): 64, 2.25x fewer).
// All transforms run in the dtype of the arrays.
//
// float32 error against a float64 direct convolution of the same float32 inputs, on the six
// layers of the README net (batch 8, He weights; grad_x from gy of the same distribution):
//                        max |error| / max |y|         relative RMS error
//   N(0, 1) inputs       3.2e-6 .. 9.6e-6              0.8e-6 .. 2.5e-6
//   U[0, 1) images       1.3e-6 .. 7.2e-6              0.3e-6 .. 1.3e-6
// against, with N(0, 1) inputs, 0.25e-6 .. 1.2e-6 and 0.1e-6 .. 0.6e-6 for the direct kernel
// and 0.2e-6 .. 0.6e-6 and 0.1e-6 .. 0.4e-6 for F(2x2, 3x3): about 4.5x the direct kernel's
// RMS error and 8x its largest.  Every stage adds about as much (the rounding of U and of V,
// the sums over channels, the output transform: the entries 4, 5, 8 of B and A and 1/6, 1/24
// of G amplify it); a float64 filter transform changes it by less than 10%.
//
// Work is split into chunks of whole tile rows ("items": a tile row, or a segment of at most
// kLd tiles of one when W > 4 kLd) of at most kLd = 128 tiles, numbered item after item with
// no gap (column j = (item - r0) * tws + tx - tx0); each thread transforms a chunk's input
// into V, runs the 36 GEMMs into M and transforms M into y, so that V and M stay in its caches.
// The input transform reads two strips per patch row a, laid out with 4 tws columns per item:
// `lo` holds input columns 4tx0-1 .. 4tx0+4tws-2 and `hi` columns 4tx0+3 .. 4tx0+4tws+2 (zero
// outside 0 .. W-1), so that tile j reads lo[4j .. 4j+3] and hi[4j .. 4j+1]: one stride-4
// loop over the whole chunk, which gcc vectorises.  The output transform writes an output strip
// of 4 rows, copied to y by rows of at most W (tiles that straddle the right or bottom edge
// write nothing outside y).  The buffers have compile-time strides (kLd, kVStride, kSlen), so
// that the transforms address their 36 streams from one pointer (with runtime strides gcc
// spilled the pointers: 15-20% slower).
// The GEMM micro-kernel (float32) is conv3x3_winograd.cpp's: 6 output channels x 64 tiles = 24
// zmm accumulators (AVX2: 6 x 16 tiles = 12 ymm), with narrower blocks of 16, 32, 48 tiles for
// the last columns.  float64 runs the same code with a plain GEMM.  Each chunk is computed by
// one thread in a fixed order: the result does not depend on the number of threads.
// The three phases are separate (noinline) functions, so that a profile shows each.
#include "conv3x3.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.hpp"
#include "winograd4.hpp"

namespace pycnn {
namespace conv {

namespace {

constexpr int kKB = 6;      // GEMM rows (output channels) per block
constexpr int kGran = 16;   // GEMM columns come in multiples of this (one zmm of float32)
constexpr int kXi = 36;     // transform elements

// U packed for the GEMM: up[xi][kblock][c][r] (rows past K are zero), up of 36 * kblocks * C *
// 6 elements.  Called inside the parallel region: the threads share out the blocks of output
// channels (an omp for, with its barrier), each writes its rows of up in order.
template <typename T>
void transform_filter(const T* w, T* up, int64_t C, int64_t K) {
    const int64_t kblocks = (K + kKB - 1) / kKB;
    using A = T;  // (float64 here gives the same float32 errors to within 10%: measured)
    const A q = A(1) / A(4), s = A(1) / A(6), e = A(1) / A(12), f = A(1) / A(24);
#pragma omp for schedule(static)
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        for (int64_t c = 0; c < C; ++c) {
            T out[kXi][kKB];
            for (int r = 0; r < kKB; ++r) {
                const int64_t k = kb * kKB + r;
                if (k >= K) {
                    for (int xi = 0; xi < kXi; ++xi) out[xi][r] = T(0);
                    continue;
                }
                const T* g = w + (k * C + c) * 9;
                A t[6][3];  // G g
                for (int j = 0; j < 3; ++j) {
                    const A g0 = g[j], g1 = g[3 + j], g2 = g[6 + j];
                    t[0][j] = q * g0;
                    t[1][j] = -s * (g0 + g1 + g2);
                    t[2][j] = -s * (g0 - g1 + g2);
                    t[3][j] = f * g0 + e * g1 + s * g2;
                    t[4][j] = f * g0 - e * g1 + s * g2;
                    t[5][j] = g2;
                }
                for (int i = 0; i < 6; ++i) {  // (G g) G^T
                    const A g0 = t[i][0], g1 = t[i][1], g2 = t[i][2];
                    out[6 * i + 0][r] = static_cast<T>(q * g0);
                    out[6 * i + 1][r] = static_cast<T>(-s * (g0 + g1 + g2));
                    out[6 * i + 2][r] = static_cast<T>(-s * (g0 - g1 + g2));
                    out[6 * i + 3][r] = static_cast<T>(f * g0 + e * g1 + s * g2);
                    out[6 * i + 4][r] = static_cast<T>(f * g0 - e * g1 + s * g2);
                    out[6 * i + 5][r] = static_cast<T>(g2);
                }
            }
            for (int xi = 0; xi < kXi; ++xi)
                std::memcpy(up + ((xi * kblocks + kb) * C + c) * kKB, out[xi], sizeof(out[xi]));
        }
    }
}

#if PYCNN_SIMD
// M[kb*6 + r][js .. js + NQ*L) for r < nk from the packed U block ub (C x 6) and V (C rows of ld).
template <int NQ>
inline void gemm_block(const float* ub, const float* v, float* m, int64_t C, int64_t ld, int64_t js, int nk) {
    using V = simd::Isa;
    using Reg = typename V::Reg;
    constexpr int L = V::kLanes;
    Reg acc[kKB][NQ];
    for (int r = 0; r < kKB; ++r)
        for (int q = 0; q < NQ; ++q) acc[r][q] = V::zero();
    for (int64_t c = 0; c < C; ++c) {
        const float* vc = v + c * ld + js;
        Reg vv[NQ];
        for (int q = 0; q < NQ; ++q) vv[q] = V::loadu(vc + L * q);
        for (int r = 0; r < kKB; ++r) {
            const Reg ur = V::set1(ub[c * kKB + r]);
            for (int q = 0; q < NQ; ++q) acc[r][q] = V::fmadd(ur, vv[q], acc[r][q]);
        }
    }
    for (int r = 0; r < kKB; ++r) {
        if (r >= nk) break;
        for (int q = 0; q < NQ; ++q) V::storeu(m + r * ld + js + L * q, acc[r][q]);
    }
}
#endif

// M[k][j] (row stride ld) for k < K, j < ncols (a multiple of kGran) = U[k][:] . V[:][j].
template <typename T>
__attribute__((noinline)) void gemm(const T* u, const T* v, T* m, int64_t C, int64_t K, int64_t ncols, int64_t ld) {
    const int64_t kblocks = (K + kKB - 1) / kKB;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        const T* ub = u + kb * C * kKB;
        const int nk = static_cast<int>(std::min<int64_t>(kKB, K - kb * kKB));
        T* mb = m + kb * kKB * ld;
#if PYCNN_SIMD
        if constexpr (std::is_same_v<T, float>) {
            using V = simd::Isa;
            constexpr int L = V::kLanes, NQ = V::kWinoVecs, B = L * NQ;  // B: columns of a full block
            static_assert(kGran % L == 0, "kGran must be whole vectors");
            int64_t js = 0;
            for (; js + B <= ncols; js += B) gemm_block<NQ>(ub, v, mb, C, ld, js, nk);
            const int rest = static_cast<int>((ncols - js) / L);  // < NQ vectors
            if constexpr (NQ == 4) {
                if (rest == 3) gemm_block<3>(ub, v, mb, C, ld, js, nk);
                else if (rest == 2) gemm_block<2>(ub, v, mb, C, ld, js, nk);
                else if (rest == 1) gemm_block<1>(ub, v, mb, C, ld, js, nk);
            } else {
                if (rest == 1) gemm_block<1>(ub, v, mb, C, ld, js, nk);
            }
            continue;
        }
#endif
        for (int64_t j0 = 0; j0 < ncols; j0 += kGran) {
            T acc[kKB][kGran] = {};
            for (int64_t c = 0; c < C; ++c) {
                const T* vc = v + c * ld + j0;
                for (int r = 0; r < kKB; ++r) {
                    const T ur = ub[c * kKB + r];
#pragma omp simd
                    for (int j = 0; j < kGran; ++j) acc[r][j] += ur * vc[j];
                }
            }
            for (int r = 0; r < nk; ++r) std::memcpy(mb + r * ld + j0, acc[r], sizeof(T) * kGran);
        }
    }
}

// The layout of a chunk's buffers, with compile-time strides so that the transforms address
// their 36 streams from one pointer:
//   V[c][xi][kLd]   (channel stride kVStride), M[k][xi][kLd] (output-channel stride kVStride)
//   the 6 rows of the lo and hi input strips and the 4 rows of the output strip: stride kSlen
// kVStride is kXi * kLd plus one cache line, so that the GEMM's rows (one per channel) do not
// all fall into the same few L1 sets.
constexpr int64_t kLd = 128;                      // GEMM columns (tiles) of a chunk, at most
constexpr int64_t kVStride = kXi * kLd + kGran;   // floats per channel of V and M
constexpr int64_t kSlen = 4 * kLd + kGran;        // strip row: 4 columns per tile, and slack for load_row

// Tile rows per chunk: its GEMM runs on rows * tw columns rounded up to kGran.  The best fill
// with at most max_cols (<= kLd) columns (more rows when the fill is the same).
int64_t chunk_rows(int64_t tw, int64_t max_cols) {
    int64_t best = 1;
    double best_fill = 0.0;
    for (int64_t rows = 1; rows * tw <= max_cols; ++rows) {
        const int64_t cols = (rows * tw + kGran - 1) / kGran * kGran;
        const double fill = static_cast<double>(rows * tw) / static_cast<double>(cols);
        if (fill >= best_fill - 1e-9) best = rows, best_fill = std::max(fill, best_fill);
    }
    return best;
}

// d[0 .. n) = s[0 .. n) (n <= W: rows are short, a libc call each costs more than the copy);
// float32: whole vectors and one masked load for the tail.  kPadded: d[n ..] is zero and may be
// overwritten with zeros up to the next multiple of the vector length (the tail is stored
// whole: load_row, into the input strips); else nothing past d[n - 1] is written (the tail's
// store is masked too: copy_row, into y).
template <bool kPadded, typename T>
inline void move_row(T* d, const T* s, int64_t n) {
#if PYCNN_SIMD
    if constexpr (std::is_same_v<T, float>) {
        using V = simd::Isa;
        constexpr int L = V::kLanes;
        int64_t i = 0;
        for (; i + L <= n; i += L) V::storeu(d + i, V::loadu(s + i));
        if (i < n) {
            if constexpr (kPadded) {
                V::storeu(d + i, V::maskz_loadu(V::mask_from_bits((1u << static_cast<int>(n - i)) - 1u), s + i));
            } else {
                const typename V::Mask mk = V::mask_from_bits((1u << static_cast<int>(n - i)) - 1u);
                V::mask_storeu(d + i, mk, V::maskz_loadu(mk, s + i));
            }
        }
        return;
    }
#endif
    std::memcpy(d, s, sizeof(T) * static_cast<size_t>(n));
}

template <typename T>
inline void copy_row(T* d, const T* s, int64_t n) { move_row<false>(d, s, n); }
template <typename T>
inline void load_row(T* d, const T* s, int64_t n) { move_row<true>(d, s, n); }

// The geometry of one call.  A row item is the tiles (n, ty, tx0 .. tx0 + tws - 1) of one tile
// row, or of one segment of it where a row has more than kLd tiles (W > 4 kLd): items are
// numbered r = (n * th + ty) * nseg + seg.  A chunk is rows_per_chunk consecutive items.
struct Plan {
    int64_t N, C, K, H, W;
    int64_t th, tw;      // tiles per column and per row of an image
    int64_t tws, nseg;   // tiles per item, items per tile row
    int64_t sw;          // strip columns per item (4 tws)
    int64_t rows_per_chunk, total_rows, nchunks;
    Plan(int64_t N_, int64_t C_, int64_t K_, int64_t H_, int64_t W_) : N(N_), C(C_), K(K_), H(H_), W(W_) {
        th = (H + 3) / 4, tw = (W + 3) / 4;
        nseg = (tw + kLd - 1) / kLd;
        tws = (tw + nseg - 1) / nseg;
        sw = 4 * tws;
        total_rows = N * th * nseg;
        // Chunks of up to kLd columns, narrower (down to 32) where there would be fewer than 4
        // per thread: small problems keep every thread busy.  Each column is computed the same
        // way whatever its chunk: the chunking does not change the result.
        const int64_t want = 4 * static_cast<int64_t>(omp_get_max_threads());
        for (int64_t max_cols = kLd;; max_cols /= 2) {
            rows_per_chunk = chunk_rows(tws, std::max(max_cols, tws));
            nchunks = (total_rows + rows_per_chunk - 1) / rows_per_chunk;
            if (nchunks >= want || max_cols <= 32) break;
        }
    }
    struct Item {
        int64_t n, ty, tx0, ntx;
    };
    Item item(int64_t r) const {
        const int64_t seg = r % nseg, row = r / nseg;
        const int64_t tx0 = seg * tws;
        return {row / th, row % th, tx0, std::min(tws, tw - tx0)};
    }
};

// V[c][xi][j] for the tile rows r0 .. r1-1 and the ncols columns (past the tiles: zero input).
// lo and hi are the two strips (6 rows each).  The zeros of the strips (padding, rows outside
// the image) are the same for every channel: filled once, then each channel copies its rows
// over the data columns.
template <typename T>
__attribute__((noinline)) void input_transform(const Plan& p, const T* x, int64_t r0, int64_t r1, int64_t ncols,
                                               T* lo, T* hi, T* v) {
    const int64_t sw = p.sw, H = p.H, W = p.W, C = p.C;
    std::fill(lo, lo + 6 * kSlen, T(0));
    std::fill(hi, hi + 6 * kSlen, T(0));
    for (int64_t c = 0; c < C; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
            // lo: input columns c0 - 1 .. c0 + sw - 2, hi: c0 + 3 .. c0 + sw + 2 (c0 = 4 tx0)
            const Plan::Item it = p.item(r);
            const int64_t c0 = 4 * it.tx0;
            const int64_t lo_from = std::max<int64_t>(0, c0 - 1), lo_to = std::min(W, c0 + sw - 1);
            const int64_t hi_from = c0 + 3, hi_to = std::min(W, c0 + sw + 3);
            const T* plane = x + (it.n * C + c) * H * W;
            for (int a = 0; a < 6; ++a) {  // strip row a: input row 4ty-1+a
                const int64_t h = 4 * it.ty - 1 + a;
                if (h < 0 || h >= H) continue;
                const T* src = plane + h * W;
                const int64_t at = a * kSlen + (r - r0) * sw;  // strip position of the item's first column
                load_row(lo + at + (lo_from - c0 + 1), src + lo_from, lo_to - lo_from);
                if (hi_to > hi_from) load_row(hi + at + (hi_from - c0 - 3), src + hi_from, hi_to - hi_from);
            }
        }
        T* vc = v + c * kVStride;
#pragma omp simd
        for (int64_t j = 0; j < ncols; ++j) {
            PYCNN_WINOGRAD4_INPUT_TILE(T, q_ < 4 ? lo + 4 * j + q_ : hi + 4 * j + (q_ - 4), kSlen, vc + j, kLd);
        }
    }
}

// y (+ b, then the epilogue) of the tile rows r0 .. r1-1 from M[k][xi][j], through the 4 rows
// of the output strip o.
template <typename T>
__attribute__((noinline)) bool output_transform(const Plan& p, const T* m, const T* b, T* y, int64_t r0, int64_t r1,
                                                T* o, const Epilogue<T>& ep) {
    T probe = T(0);  // NaN once an output is not finite (conv3x3.hpp)
    const int64_t K = p.K, H = p.H, W = p.W;
    const int64_t used = (r1 - r0) * p.tws;
    for (int64_t k = 0; k < K; ++k) {
        const T bk = b ? b[k] : T(0);
        const T* mk = m + k * kVStride;
#pragma omp simd reduction(+ : probe)
        for (int64_t j = 0; j < used; ++j) {
            T s[4][6];  // A^T M
            for (int q = 0; q < 6; ++q) {
                const T* mq = mk + q * kLd + j;
                const T m0 = mq[0], m1 = mq[6 * kLd], m2 = mq[12 * kLd], m3 = mq[18 * kLd], m4 = mq[24 * kLd],
                        m5 = mq[30 * kLd];
                const T p1 = m1 + m2, n1 = m1 - m2, p2 = m3 + m4, n2 = m3 - m4;
                s[0][q] = m0 + p1 + p2;
                s[1][q] = n1 + T(2) * n2;
                s[2][q] = p1 + T(4) * p2;
                s[3][q] = n1 + T(8) * n2 + m5;
            }
            for (int i = 0; i < 4; ++i) {  // (A^T M) A
                const T m0 = s[i][0], m1 = s[i][1], m2 = s[i][2], m3 = s[i][3], m4 = s[i][4], m5 = s[i][5];
                const T p1 = m1 + m2, n1 = m1 - m2, p2 = m3 + m4, n2 = m3 - m4;
                T* oi = o + i * kSlen + 4 * j;
                oi[0] = m0 + p1 + p2 + bk;
                oi[1] = n1 + T(2) * n2 + bk;
                oi[2] = p1 + T(4) * p2 + bk;
                oi[3] = n1 + T(8) * n2 + m5 + bk;
                probe += (oi[0] + oi[1] + oi[2] + oi[3]) * T(0);
            }
        }
        for (int64_t r = r0; r < r1; ++r) {
            const Plan::Item it = p.item(r);
            const int64_t c0 = 4 * it.tx0, nc = std::min(W, c0 + 4 * it.ntx) - c0;  // output columns c0 .. c0+nc-1
            for (int i = 0; i < 4 && 4 * it.ty + i < H; ++i) {
                const int64_t at = ((it.n * K + k) * H + 4 * it.ty + i) * W + c0;
                copy_row(y + at, o + i * kSlen + (r - r0) * p.sw, nc);
                if (ep.active()) ep.apply(y + at, at, k, nc);  // the fused epilogue (conv3x3.hpp), in L1
            }
        }
    }
    return probe == T(0);
}

// Scratch (conv3x3.hpp: thread_scratch): fresh allocations of a few MiB per call cost their
// page faults (measured: 570 per call at C = K = 64, 16 x 16, batch 64, some 10% of the time).
// Slot 0: the transformed filter (the calling thread's), slot 1: V, M and the strips (each
// team thread's).
struct Winograd4Scratch;

}  // namespace

template <typename T>
void winograd4_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W,
               const Epilogue<T>& ep) {
    const Plan p(N, C, K, H, W);
    const int64_t kblocks = (K + kKB - 1) / kKB;
    const int64_t ustride = kblocks * C * kKB;  // one xi of u
    T* const u = thread_scratch<Winograd4Scratch, T>(0, static_cast<size_t>(kXi * ustride));
    // One parallel region for the whole call (each region costs a wake-up of the team, which
    // on a busy machine can be a scheduler tick): the filter transform, then the chunks.
    int nonfinite = 0;  // an output was inf or NaN: computed again by the direct kernel
#pragma omp parallel reduction(| : nonfinite)
    {
        transform_filter(w, u, C, K);
        // V: C x kVStride
        T* const v = thread_scratch<Winograd4Scratch, T>(1, static_cast<size_t>((C + K) * kVStride + 16 * kSlen));
        T* const m = v + C * kVStride;    // M: K x kVStride
        T* const lo = m + K * kVStride;   // the strips: lo, hi (6 rows each), out (4 rows)
        T* const hi = lo + 6 * kSlen;
        T* const out = hi + 6 * kSlen;
#pragma omp for schedule(dynamic, 1)
        for (int64_t chunk = 0; chunk < p.nchunks; ++chunk) {
            const int64_t r0 = chunk * p.rows_per_chunk, r1 = std::min(p.total_rows, r0 + p.rows_per_chunk);
            const int64_t ncols = ((r1 - r0) * p.tws + kGran - 1) / kGran * kGran;
            input_transform<T>(p, x, r0, r1, ncols, lo, hi, v);
            // 36 GEMMs: M[.][xi] (K x ncols) = U[xi] (K x C) . V[.][xi] (C x ncols), rows kVStride apart
            for (int xi = 0; xi < kXi; ++xi)
                gemm<T>(u + xi * ustride, v + xi * kLd, m + xi * kLd, C, K, ncols, kVStride);
            nonfinite |= !output_transform<T>(p, m, b, y, r0, r1, out, ep);
        }
    }
    if (nonfinite) direct_forward<T>(x, w, b, y, N, C, K, H, W, ep);
}

PYCNN_CONV_INSTANTIATE(PYCNN_CONV_FORWARD_INSTANTIATE, winograd4_forward)

}  // namespace conv
}  // namespace pycnn
