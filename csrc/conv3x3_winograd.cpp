// conv3x3 by Winograd F(2x2, 3x3) (Lavin & Gray 2015): forward, and grad_input as a Winograd
// convolution with the flipped, transposed filter.  grad_weight is computed directly
// (conv3x3.cpp: direct_grad_weight).
//
// Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), y is (N, K, H, W).  The output is cut
// into 2x2 tiles (th = ceil(H/2) by tw = ceil(W/2) per image); tile (ty, tx) reads the 4x4
// input patch at rows 2ty-1 .. 2ty+2, columns 2tx-1 .. 2tx+2 (zero outside).
//   U[xi][k][c] = (G g G^T)[xi]      filter transform, once per call   (16 x K x C)
//   V[xi][c][j] = (B^T d B)[xi]      input transform of tile j         (16 x C x tiles)
//   M[xi][k][j] = sum_c U[xi][k][c] V[xi][c][j]                        16 GEMMs
//   y tile      = A^T M A                                              (+ bias)
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
// A^T = [1 1 1 0; 0 1 -1 -1]: 16 multiplies per 2x2 outputs and channel instead of 36.
//
// Work is split into chunks of whole tile rows (64 or 128 GEMM columns, see chunk_rows: one
// phantom tile per tile row keeps the input transform a single stride-2 loop); each thread
// transforms a chunk's input into V (16 x C x columns), runs the 16 GEMMs into M and
// transforms M into y, so V and M stay in its caches.  The GEMM micro-kernel (float32, AVX-512) is 6 output
// channels x 64 tiles = 24 zmm accumulators: per input channel 4 loads of V, 6 broadcasts
// of U, 24 FMAs (AVX2: 6 x 16 tiles = 12 ymm, four times per 64 tiles; simd.hpp).  The transforms are plain loops over the tiles of a row, which gcc
// vectorises.  float64 runs the same code with a plain GEMM.
#include "conv3x3.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.hpp"

namespace pycnn {
namespace conv {

namespace {

constexpr int kKB = 6;      // GEMM rows (output channels) per block
constexpr int kCols = 64;   // GEMM columns (tiles) per block: 4 zmm of float32

// U packed for the GEMM: u[xi][kblock][c][r] (rows past K are zero).
template <typename T>
std::vector<T> transform_filter(const T* w, int64_t C, int64_t K) {
    const int64_t kblocks = (K + kKB - 1) / kKB;
    std::vector<T> u(static_cast<size_t>(16 * kblocks * C * kKB), T(0));
    for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < C; ++c) {
            const T* g = w + (k * C + c) * 9;
            T t[4][3];  // G g
            for (int j = 0; j < 3; ++j) {
                t[0][j] = g[j];
                t[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
                t[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
                t[3][j] = g[6 + j];
            }
            for (int i = 0; i < 4; ++i) {
                const T r[4] = {t[i][0], T(0.5) * (t[i][0] + t[i][1] + t[i][2]), T(0.5) * (t[i][0] - t[i][1] + t[i][2]),
                                t[i][2]};
                for (int j = 0; j < 4; ++j)
                    u[static_cast<size_t>((((4 * i + j) * kblocks + k / kKB) * C + c) * kKB + k % kKB)] = r[j];
            }
        }
    }
    return u;
}

// M[k][j] (row stride ld) for k < K, j < ncols (a multiple of kCols) = U[k][:] . V[:][j].
template <typename T>
void gemm(const T* u, const T* v, T* m, int64_t C, int64_t K, int64_t ncols, int64_t ld) {
    const int64_t kblocks = (K + kKB - 1) / kKB;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        const T* ub = u + kb * C * kKB;
        const int nk = static_cast<int>(std::min<int64_t>(kKB, K - kb * kKB));
        for (int64_t j0 = 0; j0 < ncols; j0 += kCols) {
#if PYCNN_SIMD
            if constexpr (std::is_same_v<T, float>) {
                // kCols columns as sub-blocks of NQ vectors (one sub-block of 4 zmm; 4 of 2 ymm)
                using V = simd::Isa;
                using Reg = typename V::Reg;
                constexpr int L = V::kLanes, NQ = V::kWinoVecs;
                static_assert(kCols % (L * NQ) == 0, "kCols must be whole sub-blocks");
                for (int64_t js = j0; js < j0 + kCols; js += L * NQ) {
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
                        for (int q = 0; q < NQ; ++q) V::storeu(m + (kb * kKB + r) * ld + js + L * q, acc[r][q]);
                    }
                }
                continue;
            }
#endif
            T acc[kKB][kCols] = {};
            for (int64_t c = 0; c < C; ++c) {
                const T* vc = v + c * ld + j0;
                for (int r = 0; r < kKB; ++r) {
                    const T ur = ub[c * kKB + r];
#pragma omp simd
                    for (int j = 0; j < kCols; ++j) acc[r][j] += ur * vc[j];
                }
            }
            for (int r = 0; r < nk; ++r) std::memcpy(m + (kb * kKB + r) * ld + j0, acc[r], sizeof(T) * kCols);
        }
    }
}

// Tile rows per chunk: the GEMM runs on ceil(rows * (tw+1) / 64) * 64 columns, of which
// rows * tw are real tiles (one phantom tile per row, see below); pick the best fill with at
// most 128 columns.
int64_t chunk_rows(int64_t tw) {
    const int64_t tq = tw + 1;
    int64_t best = 1;
    double best_fill = 0.0;
    for (int64_t rows = 1; rows * tq <= 2 * kCols || rows == 1; ++rows) {
        const int64_t cols = (rows * tq + kCols - 1) / kCols * kCols;
        const double fill = static_cast<double>(rows * tw) / static_cast<double>(cols);
        if (fill > best_fill + 1e-9) best = rows, best_fill = fill;
    }
    return best;
}

}  // namespace

template <typename T>
void winograd_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H,
                      int64_t W, const Epilogue<T>& ep) {
    const int64_t th = (H + 1) / 2, tw = (W + 1) / 2;
    // A tile row of the chunk is one strip of pw = 2 * (tw + 1) padded columns: [0, x row, 0 (, 0)].
    // Column j of V is tile (row j / tq, tx = j % tq) with tq = tw + 1 and reads strip columns
    // 2j .. 2j+3: a uniform stride of 2 over the whole chunk, so the transform loop is one long
    // vectorised loop.  tx = tw is a phantom tile (straddles two rows): computed, never stored.
    const int64_t tq = tw + 1, pw = 2 * tq;
    const int64_t rows_per_chunk = chunk_rows(tw);
    const int64_t total_rows = N * th;  // tile rows (n, ty)
    const int64_t nchunks = (total_rows + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t ld = (rows_per_chunk * tq + kCols - 1) / kCols * kCols;  // columns of V and M
    const int64_t slen = ld * 2 + 4;                                        // strip length
    const std::vector<T> u = transform_filter(w, C, K);
    const int64_t kblocks = (K + kKB - 1) / kKB;
    const int64_t ustride = kblocks * C * kKB;  // one xi of u

    int nonfinite = 0;  // an output was inf or NaN: computed again by the direct kernel
#pragma omp parallel reduction(| : nonfinite)
    {
        std::vector<T> vbuf(static_cast<size_t>(16 * C * ld));
        std::vector<T> mbuf(static_cast<size_t>(16 * K * ld));
        std::vector<T> strip(static_cast<size_t>(4 * slen));
        std::vector<T> orow(static_cast<size_t>(2 * pw));
#pragma omp for schedule(dynamic, 1)
        for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
            const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(total_rows, r0 + rows_per_chunk);
            const int64_t used = (r1 - r0) * tq;
            const int64_t ncols = (used + kCols - 1) / kCols * kCols;
            // ---- input transform: V[xi][c][j] for the ncols columns (past `used`: zero input)
            std::fill(strip.begin(), strip.end(), T(0));
            for (int64_t c = 0; c < C; ++c) {
                for (int64_t r = r0; r < r1; ++r) {
                    const int64_t n = r / th, ty = r % th;
                    const T* plane = x + (n * C + c) * H * W;
                    for (int a = 0; a < 4; ++a) {  // strip row a: input rows 2ty-1+a
                        T* dst = strip.data() + a * slen + (r - r0) * pw + 1;
                        const int64_t h = 2 * ty - 1 + a;
                        if (h >= 0 && h < H) std::memcpy(dst, plane + h * W, sizeof(T) * W);
                        else std::fill(dst, dst + W, T(0));
                    }
                }
                const T* d0 = strip.data();
                const T* d1 = d0 + slen;
                const T* d2 = d1 + slen;
                const T* d3 = d2 + slen;
                T* vc = vbuf.data() + c * ld;
                const int64_t xs = C * ld;  // stride between transform elements xi
#pragma omp simd
                for (int64_t j = 0; j < ncols; ++j) {
                    T t[4][4];  // B^T d
                    for (int q = 0; q < 4; ++q) {
                        const int64_t col = 2 * j + q;
                        t[0][q] = d0[col] - d2[col];
                        t[1][q] = d1[col] + d2[col];
                        t[2][q] = d2[col] - d1[col];
                        t[3][q] = d1[col] - d3[col];
                    }
                    for (int i = 0; i < 4; ++i) {  // (B^T d) B
                        vc[(4 * i + 0) * xs + j] = t[i][0] - t[i][2];
                        vc[(4 * i + 1) * xs + j] = t[i][1] + t[i][2];
                        vc[(4 * i + 2) * xs + j] = t[i][2] - t[i][1];
                        vc[(4 * i + 3) * xs + j] = t[i][1] - t[i][3];
                    }
                }
            }
            // ---- 16 GEMMs: M[xi] (K x ncols) = U[xi] (K x C) . V[xi] (C x ncols)
            for (int xi = 0; xi < 16; ++xi)
                gemm<T>(u.data() + xi * ustride, vbuf.data() + xi * C * ld, mbuf.data() + xi * K * ld, C, K, ncols, ld);
            // an inf or NaN output comes from an inf or NaN in M (conv3x3.hpp): checked here, in
            // long rows (the output transform's rows are a tile row each: too short to check)
            for (int64_t row = 0; row < 16 * K; ++row) nonfinite |= !all_finite(mbuf.data() + row * ld, ncols);
            // ---- output transform: y = A^T M A + b
            const int64_t ms = K * ld;  // stride between xi in M
            for (int64_t k = 0; k < K; ++k) {
                const T bk = b ? b[k] : T(0);
                const T* mk = mbuf.data() + k * ld;
                for (int64_t r = r0; r < r1; ++r) {
                    const int64_t n = r / th, ty = r % th;
                    const T* mj = mk + (r - r0) * tq;
                    T* o0 = orow.data();
                    T* o1 = o0 + pw;
#pragma omp simd
                    for (int64_t tx = 0; tx < tw; ++tx) {
                        T s[2][4];  // A^T M
                        for (int j = 0; j < 4; ++j) {
                            const T m0 = mj[(0 + j) * ms + tx], m1 = mj[(4 + j) * ms + tx];
                            const T m2 = mj[(8 + j) * ms + tx], m3 = mj[(12 + j) * ms + tx];
                            s[0][j] = m0 + m1 + m2;
                            s[1][j] = m1 - m2 - m3;
                        }
                        o0[2 * tx] = s[0][0] + s[0][1] + s[0][2] + bk;
                        o0[2 * tx + 1] = s[0][1] - s[0][2] - s[0][3] + bk;
                        o1[2 * tx] = s[1][0] + s[1][1] + s[1][2] + bk;
                        o1[2 * tx + 1] = s[1][1] - s[1][2] - s[1][3] + bk;
                    }
                    const int64_t at = ((n * K + k) * H + 2 * ty) * W;
                    T* yp = y + at;
                    std::memcpy(yp, o0, sizeof(T) * W);
                    if (ep.active()) ep.apply(yp, at, k, W);  // the fused epilogue (conv3x3.hpp), in L1
                    if (2 * ty + 1 < H) {
                        std::memcpy(yp + W, o1, sizeof(T) * W);
                        if (ep.active()) ep.apply(yp + W, at + W, k, W);
                    }
                }
            }
        }
    }
    if (nonfinite) direct_forward<T>(x, w, b, y, N, C, K, H, W, ep);
}

PYCNN_CONV_INSTANTIATE(PYCNN_CONV_FORWARD_INSTANTIATE, winograd_forward)

}  // namespace conv
}  // namespace pycnn
