// conv3x3 grad_weight by Winograd F(4x4, 3x3): the adjoint of conv3x3_winograd4.cpp's forward.
//
// The forward pass computes each 4x4 output tile as y = A^T [(G g G^T) . (B^T d B)] A (d the
// 6x6 input patch of the tile, g a 3x3 filter; the matrices are in conv3x3_winograd4.cpp).
// y is linear in g, and its adjoint gives, summed over the images n and the tiles t:
//   gw[k, c] = G^T M[k, c] G,   M[k, c] = sum_{n, t} (A gy_{n,k,t} A^T) . (B^T x_{n,c,t} B)
// that is 36 GEMMs  M[xi] (K x C) = Z[xi] (K x tiles) . V[xi]^T (tiles x C)  with
//   V[xi][c][t] = (B^T x B)[xi] of tile t of channel c   (the forward's input transform)
//   Z[xi][k][t] = (A gy A^T)[xi] of tile t of channel k  (gy zero outside the image)
// 36 multiplies per tile and channel pair instead of the direct kernel's 9 x 16 = 144.
//
// Tiles are contiguous (t = image * tiles per image + tile row * tiles per row + tile column),
// so both transforms read the image planes as they are (NCHW) and run vectorised over tiles,
// through strips as in the forward pass: the patch rows of a run of tile rows are copied to
// zero-padded strips where tile j reads columns 4j .. 4j + 5.  The GEMMs are dot products over
// the tiles: a block of 4 output x 6 input channels keeps 24 vector accumulators over the
// tiles (AVX2: 2 x 6), summed across lanes once per group.
// The batch goes in groups of images whose V and Z rows of one xi fit in L2 (the whole group
// then fits in L3), each group in two phases: the transforms, a channel per task, then the
// GEMMs, an (xi, block of output channels) per task, which adds its sums into its own entries
// of M.  The tiles of a group are summed in order and the groups in order: the result depends
// neither on the thread count nor on the schedule.
// float32 error: tests/test_winograd4.py bounds it with the forward's (measured in the closing
// table of conv3x3_winograd4.cpp).
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

constexpr int kXi = 36;
constexpr int64_t kXiRowBytes = int64_t(512) << 10;  // the V and Z rows of one xi in a group, at most
constexpr int64_t kStripTiles = 256;                  // tiles per strip run, at least (a whole tile row)

#if PYCNN_SIMD
#if defined(__AVX512F__)
constexpr int kKR = 4, kCR = 6;  // GEMM block: output x input channels (24 zmm accumulators)
#else
constexpr int kKR = 2, kCR = 6;  // 12 ymm accumulators
#endif
constexpr int kPad = simd::Isa::kLanes;
#else
constexpr int kKR = 4, kCR = 6;
constexpr int kPad = 16;
#endif

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// The tile rows of the group's images: row r = image * th + ty, tw tiles each.
struct Geometry {
    int64_t H, W, th, tw, slen;  // slen: strip row length (4 tiles columns per tile, and slack)
};

// V[xi][c][t] (xi stride vs) of tile rows r0 .. r1 - 1 of channel plane group `x` (the group's
// first image, channel c; images cstride apart): strips lo (input columns 4j - 1 .. 4j + 2 of
// tile j) and hi (4j + 3, 4j + 4), 6 rows each (input rows 4 ty - 1 .. 4 ty + 4).
template <typename T>
void input_run(const Geometry& g, const T* x, int64_t cstride, int64_t r0, int64_t r1, T* lo, T* hi, T* v,
               int64_t vs) {
    const int64_t H = g.H, W = g.W, tw = g.tw, sw = 4 * tw;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th, at = (r - r0) * sw;
        for (int a = 0; a < 6; ++a) {  // lo[i] = x[row][i - 1], hi[i] = x[row][i + 3] (zero outside)
            T* l = lo + a * g.slen + at;
            T* h = hi + a * g.slen + at;
            const int64_t row = 4 * ty - 1 + a;
            const T* src = x + n * cstride + row * W;
            const bool inside = row >= 0 && row < H;
            for (int64_t i = 0; i < sw; ++i) {
                l[i] = inside && i >= 1 && i <= W ? src[i - 1] : T(0);
                h[i] = inside && i + 3 < W ? src[i + 3] : T(0);
            }
        }
    }
    const int64_t tiles = (r1 - r0) * tw, slen = g.slen;
    T* out = v + r0 * tw;
#pragma omp simd
    for (int64_t j = 0; j < tiles; ++j) {
        T t[6][6];  // B^T d: t[i][q] for patch column q
        for (int q = 0; q < 6; ++q) {
            const T* s = q < 4 ? lo + 4 * j + q : hi + 4 * j + (q - 4);
            const T d0 = s[0], d1 = s[slen], d2 = s[2 * slen], d3 = s[3 * slen], d4 = s[4 * slen], d5 = s[5 * slen];
            const T a1 = d4 - T(4) * d2, a2 = d3 - T(4) * d1;
            const T b1 = d4 - d2, b2 = T(2) * (d3 - d1);
            t[0][q] = T(4) * d0 - T(5) * d2 + d4;
            t[1][q] = a1 + a2;
            t[2][q] = a1 - a2;
            t[3][q] = b1 + b2;
            t[4][q] = b1 - b2;
            t[5][q] = T(4) * d1 - T(5) * d3 + d5;
        }
        for (int i = 0; i < 6; ++i) {  // (B^T d) B
            const T d0 = t[i][0], d1 = t[i][1], d2 = t[i][2], d3 = t[i][3], d4 = t[i][4], d5 = t[i][5];
            const T a1 = d4 - T(4) * d2, a2 = d3 - T(4) * d1;
            const T b1 = d4 - d2, b2 = T(2) * (d3 - d1);
            T* o = out + 6 * i * vs + j;
            o[0] = T(4) * d0 - T(5) * d2 + d4;
            o[vs] = a1 + a2;
            o[2 * vs] = a1 - a2;
            o[3 * vs] = b1 + b2;
            o[4 * vs] = b1 - b2;
            o[5 * vs] = T(4) * d1 - T(5) * d3 + d5;
        }
    }
}

// Z[xi][k][t] (xi stride zs) of tile rows r0 .. r1 - 1 of gy's channel k: A d A^T of the 4x4
// patch at rows 4 ty .. 4 ty + 3, columns 4 tx .. 4 tx + 3 (zero past the image), through one
// strip s of 4 rows where tile j reads columns 4j .. 4j + 3.
// A (6 x 4) has the rows [1 0 0 0], [1 1 1 1], [1 -1 1 -1], [1 2 4 8], [1 -2 4 -8], [0 0 0 1].
template <typename T>
void grad_run(const Geometry& g, const T* gy, int64_t kstride, int64_t r0, int64_t r1, T* s, T* z, int64_t zs) {
    const int64_t H = g.H, W = g.W, tw = g.tw, sw = 4 * tw;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.th, ty = r % g.th, at = (r - r0) * sw;
        for (int a = 0; a < 4; ++a) {  // s[i] = gy[row][i] (zero outside)
            T* d = s + a * g.slen + at;
            const int64_t row = 4 * ty + a;
            const T* src = gy + n * kstride + row * W;
            const bool inside = row < H;
            for (int64_t i = 0; i < sw; ++i) d[i] = inside && i < W ? src[i] : T(0);
        }
    }
    const int64_t tiles = (r1 - r0) * tw, slen = g.slen;
    T* out = z + r0 * tw;
#pragma omp simd
    for (int64_t j = 0; j < tiles; ++j) {
        T t[6][4];  // A d: t[i][q] for patch column q
        for (int q = 0; q < 4; ++q) {
            const T* p = s + 4 * j + q;
            const T d0 = p[0], d1 = p[slen], d2 = p[2 * slen], d3 = p[3 * slen];
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
            T* q = out + 6 * i * zs + j;
            q[0] = d0;
            q[zs] = e + o;
            q[2 * zs] = e - o;
            q[3 * zs] = e4 + o8;
            q[4 * zs] = e4 - o8;
            q[5 * zs] = d3;
        }
    }
}

// sums[i][c] = dot(z[i], v[c]) over n (a multiple of kPad) for kKR rows z and kCR rows v.
template <typename T>
void dot_block(const T* const z[kKR], const T* const v[kCR], int64_t n, T sums[kKR][kCR]) {
#if PYCNN_SIMD
    if constexpr (std::is_same_v<T, float>) {
        using V = simd::Isa;
        using Reg = typename V::Reg;
        constexpr int L = V::kLanes;
        Reg acc[kKR][kCR];
        for (int i = 0; i < kKR; ++i)
            for (int c = 0; c < kCR; ++c) acc[i][c] = V::zero();
        for (int64_t t = 0; t < n; t += L) {
            Reg zz[kKR];
            for (int i = 0; i < kKR; ++i) zz[i] = V::loadu(z[i] + t);
            for (int c = 0; c < kCR; ++c) {
                const Reg vv = V::loadu(v[c] + t);
                for (int i = 0; i < kKR; ++i) acc[i][c] = V::fmadd(zz[i], vv, acc[i][c]);
            }
        }
        for (int i = 0; i < kKR; ++i)
            for (int c = 0; c < kCR; ++c) {
                float lanes[L];
                V::storeu(lanes, acc[i][c]);
                float total = 0.0f;
                for (int l = 0; l < L; ++l) total += lanes[l];
                sums[i][c] = total;
            }
        return;
    }
#endif
    for (int i = 0; i < kKR; ++i)
        for (int c = 0; c < kCR; ++c) {
            T total = T(0);
#pragma omp simd reduction(+ : total)
            for (int64_t t = 0; t < n; ++t) total += z[i][t] * v[c][t];
            sums[i][c] = total;
        }
}

template <typename T>
T* scratch(int slot, size_t n) {
    thread_local std::vector<T> buf[2];  // kept between calls, grown when needed (never shrinks)
    if (buf[slot].size() < n + 16) buf[slot].resize(n + 16);
    T* p = buf[slot].data();
    return p + (64 - reinterpret_cast<std::uintptr_t>(p) % 64) % 64 / sizeof(T);
}

}  // namespace

template <typename T>
void winograd4_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W) {
    Geometry g{H, W, (H + 3) / 4, (W + 3) / 4, 0};
    const int64_t per_image = g.th * g.tw;
    const int64_t group = std::clamp<int64_t>(kXiRowBytes / ((C + K) * per_image * int64_t(sizeof(T))), 1, N);
    const int64_t tpad = round_up(group * per_image, kPad);  // tiles of a row of V and Z (zero past the group's)
    const int64_t run_rows = std::max<int64_t>(1, kStripTiles / g.tw);  // tile rows per strip run
    g.slen = 4 * run_rows * g.tw + 16;

    // The calling thread's scratch: M (36 x K x C), V (36 x C x tpad), Z (36 x K x tpad), a row of zeros.
    const int64_t m_size = kXi * K * C, v_size = kXi * C * tpad, z_size = kXi * K * tpad;
    T* const m = scratch<T>(0, static_cast<size_t>(m_size + v_size + z_size + tpad));
    T* const v = m + m_size;
    T* const z = v + v_size;
    T* const zeros = z + z_size;
    std::fill(zeros, zeros + tpad, T(0));
    std::fill(m, m + m_size, T(0));
    const int64_t kblocks = (K + kKR - 1) / kKR, cblocks = (C + kCR - 1) / kCR;

#pragma omp parallel
    {
        T* const strips = scratch<T>(1, static_cast<size_t>(12 * g.slen));  // this thread's: lo, hi (6 rows each)
        for (int64_t n0 = 0; n0 < N; n0 += group) {
            const int64_t ng = std::min(group, N - n0), tiles = ng * per_image, rows = ng * g.th;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < C + K; ++item) {  // the transforms of one channel of x or gy
                const bool is_x = item < C;
                const int64_t ch = is_x ? item : item - C, nch = is_x ? C : K;
                T* rows_out = (is_x ? v : z) + ch * tpad;  // row of xi = 0; xi stride nch * tpad
                const int64_t xs = nch * tpad;
                for (int64_t r0 = 0; r0 < rows; r0 += run_rows) {
                    const int64_t r1 = std::min(rows, r0 + run_rows);
                    if (is_x)
                        input_run(g, x + (n0 * C + ch) * H * W, C * H * W, r0, r1, strips, strips + 6 * g.slen,
                                  rows_out, xs);
                    else
                        grad_run(g, gy + (n0 * K + ch) * H * W, K * H * W, r0, r1, strips, rows_out, xs);
                }
                for (int xi = 0; xi < kXi; ++xi) std::fill(rows_out + xi * xs + tiles, rows_out + xi * xs + tpad, T(0));
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < kXi * kblocks; ++task) {  // M[xi][rows of kb] += Z[xi] V[xi]^T
                const int64_t xi = task / kblocks, k0 = task % kblocks * kKR;
                const T* zrow[kKR];
                for (int i = 0; i < kKR; ++i) zrow[i] = k0 + i < K ? z + (xi * K + k0 + i) * tpad : zeros;
                for (int64_t cb = 0; cb < cblocks; ++cb) {
                    const int64_t c0 = cb * kCR;
                    const T* vrow[kCR];
                    for (int c = 0; c < kCR; ++c) vrow[c] = c0 + c < C ? v + (xi * C + c0 + c) * tpad : zeros;
                    T sums[kKR][kCR];
                    dot_block<T>(zrow, vrow, tpad, sums);
                    for (int i = 0; i < kKR && k0 + i < K; ++i)
                        for (int c = 0; c < kCR && c0 + c < C; ++c) m[(xi * K + k0 + i) * C + c0 + c] += sums[i][c];
                }
            }
        }
        // gw[k, c] = G^T M[k, c] G; G^T rows: [1/4 -1/6 -1/6 1/24 1/24 0], [0 -1/6 1/6 1/12 -1/12 0],
        // [0 -1/6 -1/6 1/6 1/6 1] (in double: 36 values per filter, a small cost)
#pragma omp for schedule(static)
        for (int64_t kc = 0; kc < K * C; ++kc) {
            const double q = 1.0 / 4, s = 1.0 / 6, e = 1.0 / 12, f = 1.0 / 24;
            double mm[6][6];
            for (int xi = 0; xi < kXi; ++xi) mm[xi / 6][xi % 6] = static_cast<double>(m[xi * K * C + kc]);
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
