// conv3x3 grad_weight by Winograd F(4x4, 3x3): the adjoint of conv3x3_winograd4.cpp's forward.
//
// The forward pass computes each 4x4 output tile as y = A^T [(G g G^T) . (B^T d B)] A (d the
// 6x6 input patch of the tile, g a 3x3 filter; the matrices are in conv3x3_winograd4.cpp).
// y is linear in g, and its adjoint gives, summed over the images n and the tiles t:
//   gw[k, c] = G^T M[k, c] G,   M[k, c] = sum_{n, t} (A gy_{n,k,t} A^T) . (B^T x_{n,c,t} B)
// that is 36 GEMMs  M[xi] (K x C) = Z[xi] (K x tiles) . V[xi] (tiles x C)  with
//   V[xi][t][c] = (B^T x B)[xi] of tile t of channel c   (the forward's input transform)
//   Z[xi][t][k] = (A gy A^T)[xi] of tile t of channel k  (gy zero outside the image)
// 36 multiplies per tile and channel pair instead of the direct kernel's 9 x 16 = 144.
//
// Work stays in each thread's caches, as in the forward pass.  The tile rows (image, ty) are
// cut into blocks of up to 256 tiles whose V and Z fit in about 2 MiB; for a block, a thread
//   1. copies the 6 input rows (4 gy rows) of each tile row to channels-last slabs, zero-padded
//      (channels_last.hpp, shared with the direct kernel), so that
//   2. both transforms run vectorised over channels, writing V and Z with channels contiguous;
//   3. adds the block's 36 GEMMs into its slice's M: 6 output channels x 4 vectors of input
//      channels of M stay in registers while the block's tiles stream past (6 broadcasts and
//      4 loads per 24 fused multiply-adds).
// The blocks are shared out to a fixed number of slices (from the problem's size, never the
// thread count); each slice sums its blocks in order into its own M, the slices are added in
// order at the end: the result depends neither on the thread count nor on the schedule.
// float32 error against a float64 direct computation of the same float32 inputs (batch 16, N(0, 1)
// x and gy, the five README layers from 32 channels): max |error| / max |gw| 4.2e-6 .. 8.3e-6 and
// relative RMS 1.8e-6 .. 3.4e-6, against 1.0e-6 .. 4.1e-6 and 0.5e-6 .. 2.2e-6 for the direct
// kernel (whose sums run over 16x more terms of one product each): 2-5x its largest error, like
// the forward (tests/test_winograd4.py bounds both with one bound).
#include "conv3x3.hpp"
#include "channels_last.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.hpp"
#include "winograd4.hpp"

namespace pycnn {
namespace conv {

namespace {

constexpr int kXi = 36;
constexpr int kRows = 6;                            // output channels per GEMM block
constexpr int64_t kBlockBytes = int64_t(2) << 20;   // V and Z of one block of tiles, at most
constexpr int64_t kMaxBlockTiles = 256;
constexpr int64_t kSliceBytes = int64_t(48) << 20;  // the M of every slice together, at most
constexpr int64_t kMaxSlices = 16;
constexpr int64_t kSliceTiles = 64;                 // tiles per slice, at least (where there are that many)

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

struct Plan {
    int64_t N, C, K, H, W;
    int64_t th, tw;                    // tiles per column and per row of an image
    int64_t Cp, Kp, mrows, kblocks;    // channels rounded up to 16; M rows (whole blocks of 6)
    int64_t xw, gw;                    // slab widths in pixels: 4 tw + 2 (x), 4 tw (gy)
    int64_t rows_per_block, nblocks, block_tiles;
    int64_t slices;
    Plan(int64_t N_, int64_t C_, int64_t K_, int64_t H_, int64_t W_, size_t item) : N(N_), C(C_), K(K_), H(H_), W(W_) {
        th = (H + 3) / 4, tw = (W + 3) / 4;
        kblocks = (K + kRows - 1) / kRows;
        mrows = kblocks * kRows;
        Cp = round_up(C, 16), Kp = round_up(mrows, 16);
        xw = 4 * tw + 2, gw = 4 * tw;
        const int64_t tile_bytes = kXi * (Cp + Kp) * static_cast<int64_t>(item);
        const int64_t want = std::clamp<int64_t>(kBlockBytes / tile_bytes, 1, kMaxBlockTiles);
        rows_per_block = std::max<int64_t>(1, want / tw);
        const int64_t rows = N * th;
        nblocks = (rows + rows_per_block - 1) / rows_per_block;
        block_tiles = rows_per_block * tw;
        const int64_t m_bytes = kXi * mrows * Cp * static_cast<int64_t>(item);
        const int64_t by_tiles = std::max<int64_t>(1, rows * tw / kSliceTiles);
        const int64_t most = std::clamp<int64_t>(std::min({by_tiles, kSliceBytes / m_bytes, nblocks}), 1, kMaxSlices);
        for (slices = 1; 2 * slices <= most;) slices *= 2;  // a power of two: even shares for 2, 4, ... threads
    }
};

// The slabs of tile row (n, ty): xs[a] (a < 6) = input row 4 ty - 1 + a at pixels 1 .. W of
// xw (zero around and outside the image), gs[a] (a < 4) = gy row 4 ty + a at pixels 0 .. W - 1
// of gw (zero past W and H).
template <typename T>
void fill_slabs(const Plan& p, const T* x, const T* gy, int64_t n, int64_t ty, T* xs, T* gs) {
    const int64_t H = p.H, W = p.W, Cp = p.Cp, Kp = p.Kp, plane = H * W;
    for (int a = 0; a < 6; ++a) {
        T* row = xs + a * p.xw * Cp;
        const int64_t h = 4 * ty - 1 + a;
        if (h < 0 || h >= H) {
            std::fill(row, row + p.xw * Cp, T(0));
            continue;
        }
        std::fill(row, row + Cp, T(0));                          // pixel 0 (column -1)
        std::fill(row + (W + 1) * Cp, row + p.xw * Cp, T(0));    // columns W .. 4 tw
        row_to_channels_last(x + n * p.C * plane + h * W, plane, p.C, Cp, W, row, 1);
    }
    for (int a = 0; a < 4; ++a) {
        T* row = gs + a * p.gw * Kp;
        const int64_t h = 4 * ty + a;
        if (h >= H) {
            std::fill(row, row + p.gw * Kp, T(0));
            continue;
        }
        std::fill(row + W * Kp, row + p.gw * Kp, T(0));
        row_to_channels_last(gy + n * p.K * plane + h * W, plane, p.K, Kp, W, row, 0);
    }
}

// V and Z of the tw tiles of one tile row, from its slabs: tile tx of the row is tile t0 + tx
// of the block; V[xi][t][c] at v + (xi * block_tiles + t) * Cp + c (Z likewise with Kp).
template <typename T>
void transform_row(const Plan& p, const T* xs, const T* gs, int64_t t0, T* v, T* z) {
    const int64_t Cp = p.Cp, Kp = p.Kp, vs = p.block_tiles * Cp, zs = p.block_tiles * Kp;
    const int64_t xrow = p.xw * Cp, grow = p.gw * Kp;
    for (int64_t tx = 0; tx < p.tw; ++tx) {
        const T* d = xs + 4 * tx * Cp;  // the patch: d[a * xrow + b * Cp + c]
        T* out = v + (t0 + tx) * Cp;
#pragma omp simd
        for (int64_t c = 0; c < Cp; ++c) {
            PYCNN_WINOGRAD4_INPUT_TILE(T, d + q_ * Cp + c, xrow, out + c, vs);
        }
        // A d A^T of the 4x4 gy patch; A (6 x 4) has the rows [1 0 0 0], [1 1 1 1], [1 -1 1 -1],
        // [1 2 4 8], [1 -2 4 -8], [0 0 0 1]
        const T* g = gs + 4 * tx * Kp;
        T* zout = z + (t0 + tx) * Kp;
#pragma omp simd
        for (int64_t k = 0; k < Kp; ++k) {
            T t[6][4];  // A d: t[i][q] for patch column q
            for (int q = 0; q < 4; ++q) {
                const T* s = g + q * Kp + k;
                const T d0 = s[0], d1 = s[grow], d2 = s[2 * grow], d3 = s[3 * grow];
                const T e = d0 + d2, o = d1 + d3, e4 = d0 + T(4) * d2, o8 = T(2) * d1 + T(8) * d3;
                t[0][q] = d0;
                t[1][q] = e + o;
                t[2][q] = e - o;
                t[3][q] = e4 + o8;
                t[4][q] = e4 - o8;
                t[5][q] = d3;
            }
            for (int i = 0; i < 6; ++i) {  // (A d) A^T
                const T d0 = t[i][0], d1 = t[i][1], d2 = t[i][2], d3 = t[i][3];
                const T e = d0 + d2, o = d1 + d3, e4 = d0 + T(4) * d2, o8 = T(2) * d1 + T(8) * d3;
                T* r = zout + 6 * i * zs + k;
                r[0] = d0;
                r[zs] = e + o;
                r[2 * zs] = e - o;
                r[3 * zs] = e4 + o8;
                r[4 * zs] = e4 - o8;
                r[5 * zs] = d3;
            }
        }
    }
}

#if PYCNN_SIMD
// m[r][js .. js + NQ L) += sum_t z[t][r] v[t][js ..] for r < nk (z rows Kp apart, v rows Cp apart).
template <int NQ>
inline void gemm_block(const float* z, const float* v, float* m, int64_t tiles, int64_t Kp, int64_t Cp, int64_t js,
                       int nk) {
    using V = simd::Isa;
    using Reg = typename V::Reg;
    constexpr int L = V::kLanes;
    Reg acc[kRows][NQ];
    for (int r = 0; r < kRows; ++r)
        for (int q = 0; q < NQ; ++q) acc[r][q] = r < nk ? V::loadu(m + r * Cp + js + L * q) : V::zero();
    for (int64_t t = 0; t < tiles; ++t) {
        const float* zt = z + t * Kp;
        const float* vt = v + t * Cp + js;
        Reg vv[NQ];
        for (int q = 0; q < NQ; ++q) vv[q] = V::loadu(vt + L * q);
        for (int r = 0; r < kRows; ++r) {
            const Reg zr = V::set1(zt[r]);
            for (int q = 0; q < NQ; ++q) acc[r][q] = V::fmadd(zr, vv[q], acc[r][q]);
        }
    }
    for (int r = 0; r < nk; ++r)
        for (int q = 0; q < NQ; ++q) V::storeu(m + r * Cp + js + L * q, acc[r][q]);
}
#endif

// m[r][c] += sum_t z[t][r] v[t][c] for the nk rows of one block of 6, every column c < Cp.
template <typename T>
void gemm_rows(const T* z, const T* v, T* m, int64_t tiles, int64_t Kp, int64_t Cp, int nk) {
#if PYCNN_SIMD
    if constexpr (std::is_same_v<T, float>) {
        using V = simd::Isa;
        constexpr int L = V::kLanes, NQ = V::kWinoVecs, B = L * NQ;
        int64_t js = 0;
        for (; js + B <= Cp; js += B) gemm_block<NQ>(z, v, m, tiles, Kp, Cp, js, nk);
        const int rest = static_cast<int>((Cp - js) / L);  // Cp is a multiple of 16: whole vectors
        if constexpr (NQ == 4) {
            if (rest == 3) gemm_block<3>(z, v, m, tiles, Kp, Cp, js, nk);
            else if (rest == 2) gemm_block<2>(z, v, m, tiles, Kp, Cp, js, nk);
            else if (rest == 1) gemm_block<1>(z, v, m, tiles, Kp, Cp, js, nk);
        } else {
            if (rest == 1) gemm_block<1>(z, v, m, tiles, Kp, Cp, js, nk);
        }
        return;
    }
#endif
    for (int64_t t = 0; t < tiles; ++t)
        for (int r = 0; r < nk; ++r) {
            const T zr = z[t * Kp + r];
            T* mr = m + r * Cp;
            const T* vt = v + t * Cp;
#pragma omp simd
            for (int64_t c = 0; c < Cp; ++c) mr[c] += zr * vt[c];
        }
}

struct GradWeightScratch;  // the tag of this kernel's thread_scratch buffers

}  // namespace

template <typename T>
void winograd4_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W) {
    const Plan p(N, C, K, H, W, sizeof(T));
    const int64_t Cp = p.Cp, Kp = p.Kp, m_size = kXi * p.mrows * Cp;
    // M of slice s at ms + s m_size
    T* const ms = thread_scratch<GradWeightScratch, T>(0, static_cast<size_t>(p.slices * m_size));

#pragma omp parallel
    {
        const int64_t xslab = 6 * p.xw * Cp, gslab = 4 * p.gw * Kp;
        const size_t slabs_v_z = static_cast<size_t>(xslab + gslab + kXi * p.block_tiles * (Cp + Kp));
        T* const xs = thread_scratch<GradWeightScratch, T>(1, slabs_v_z);
        T* const gs = xs + xslab;
        T* const v = gs + gslab;
        T* const z = v + kXi * p.block_tiles * Cp;
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < p.slices; ++s) {
            T* const m = ms + s * m_size;
            std::fill(m, m + m_size, T(0));
            const int64_t b0 = s * p.nblocks / p.slices, b1 = (s + 1) * p.nblocks / p.slices;
            for (int64_t b = b0; b < b1; ++b) {
                const int64_t r0 = b * p.rows_per_block, r1 = std::min(p.N * p.th, r0 + p.rows_per_block);
                for (int64_t r = r0; r < r1; ++r) {
                    fill_slabs(p, x, gy, r / p.th, r % p.th, xs, gs);
                    transform_row(p, xs, gs, (r - r0) * p.tw, v, z);
                }
                const int64_t tiles = (r1 - r0) * p.tw;
                for (int xi = 0; xi < kXi; ++xi)
                    for (int64_t kb = 0; kb < p.kblocks; ++kb) {
                        const int nk = static_cast<int>(std::min<int64_t>(kRows, K - kb * kRows));
                        gemm_rows(z + xi * p.block_tiles * Kp + kb * kRows, v + xi * p.block_tiles * Cp,
                                  m + (xi * p.mrows + kb * kRows) * Cp, tiles, Kp, Cp, nk);
                    }
            }
        }
        // M = the sum of the slices' (in slice order) into slice 0
        if (p.slices > 1) {
#pragma omp for schedule(static)
            for (int64_t i0 = 0; i0 < m_size; i0 += 1024) {
                const int64_t i1 = std::min(m_size, i0 + 1024);
                for (int64_t s = 1; s < p.slices; ++s) {
                    const T* src = ms + s * m_size;
#pragma omp simd
                    for (int64_t i = i0; i < i1; ++i) ms[i] += src[i];
                }
            }
        }
        // gw[k, c] = G^T M[k, c] G; G^T rows: [1/4 -1/6 -1/6 1/24 1/24 0], [0 -1/6 1/6 1/12 -1/12 0],
        // [0 -1/6 -1/6 1/6 1/6 1] (in double: 36 values per filter, a small cost)
#pragma omp for schedule(static)
        for (int64_t kc = 0; kc < K * C; ++kc) {
            const int64_t k = kc / C, c = kc % C;
            const double q = 1.0 / 4, s = 1.0 / 6, e = 1.0 / 12, f = 1.0 / 24;
            double mm[6][6];
            for (int xi = 0; xi < kXi; ++xi) mm[xi / 6][xi % 6] = static_cast<double>(ms[(xi * p.mrows + k) * Cp + c]);
            double r[3][6];  // G^T M
            for (int b = 0; b < 6; ++b) {
                const double m0 = mm[0][b], m1 = mm[1][b], m2 = mm[2][b], m3 = mm[3][b], m4 = mm[4][b], m5 = mm[5][b];
                r[0][b] = q * m0 - s * (m1 + m2) + f * (m3 + m4);
                r[1][b] = s * (m2 - m1) + e * (m3 - m4);
                r[2][b] = s * (m3 + m4 - m1 - m2) + m5;
            }
            T* out = gw + kc * 9;
            for (int i = 0; i < 3; ++i) {  // (G^T M) G
                const double m0 = r[i][0], m1 = r[i][1], m2 = r[i][2], m3 = r[i][3], m4 = r[i][4], m5 = r[i][5];
                out[3 * i + 0] = static_cast<T>(q * m0 - s * (m1 + m2) + f * (m3 + m4));
                out[3 * i + 1] = static_cast<T>(s * (m2 - m1) + e * (m3 - m4));
                out[3 * i + 2] = static_cast<T>(s * (m3 + m4 - m1 - m2) + m5);
            }
        }
    }
}

template void winograd4_grad_weight<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                                           int64_t);
template void winograd4_grad_weight<double>(const double*, const double*, double*, int64_t, int64_t, int64_t,
                                            int64_t, int64_t);

}  // namespace conv
}  // namespace pycnn
