// conv3x3 grad_weight by Winograd F(4x4, 3x3): the adjoint of conv3x3_winograd4.cpp's forward.
//
// The forward pass computes each 4x4 output tile as y = A^T [(G g G^T) . (B^T d B)] A (d the
// 6x6 input patch of the tile, g a 3x3 filter; the matrices are in conv3x3_winograd4.cpp).
// y is linear in g, and its adjoint gives, summed over the images n and the tiles t:
//   gw[k, c] = G^T M[k, c] G,   M[k, c] = sum_{n, t} (A gy_{n,k,t} A^T) . (B^T x_{n,c,t} B)
// that is 36 GEMMs  M[xi] (K x C) = Z[xi] (K x tiles) . V[xi]^T (tiles x C)  with
//   V[xi][t][c] = (B^T x B)[xi] of tile t of channel c   (the forward's input transform)
//   Z[xi][t][k] = (A gy A^T)[xi] of tile t of channel k  (gy zero outside the image)
// 36 multiplies per tile and channel pair instead of the direct kernel's 9 x 16 = 144.
//
// Layout: channels contiguous.  x and gy are first copied to zero-padded channels-last planes
// (to_padded_channels_last, shared with the direct kernel), so the transforms run vectorised
// over channels and read patches past the image as the zero border (or a row of zeros).  The
// batch goes in groups of images whose V and Z fit in about 16 MiB (half the L3), each group in
// two phases: the planes and transforms, image by image, then the GEMMs that add into M (a
// barrier after each: on a loaded machine every barrier waits for a thread that lost its core).  A GEMM task is one (xi, block of 6 output
// channels): it owns those rows of M, and sums the tiles of a group in order and the groups
// in order, so the result depends neither on the thread count nor on the schedule.
// float32 error: see winograd4_grad_weight in tests/test_winograd4.py and the closing table of
// conv3x3_winograd4.cpp (about that of the forward's).
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
constexpr int kRows = 6;                         // output channels per GEMM block
constexpr int64_t kGroupBytes = int64_t(16) << 20;  // V, Z and the planes of one group of images

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// Planes of one image: (H + 2) x (W + 2) pixels of Cp channels, the image at (1, 1).
template <typename T>
void padded_planes(const T* x, T* xt, int64_t C, int64_t Cp, int64_t H, int64_t W) {
    if constexpr (std::is_same_v<T, float>) {
        to_padded_channels_last(x, xt, C, Cp, H, W);
    } else {
        std::fill(xt, xt + (H + 2) * (W + 2) * Cp, T(0));
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = 0; h < H; ++h)
                for (int64_t w = 0; w < W; ++w) xt[((h + 1) * (W + 2) + w + 1) * Cp + c] = x[(c * H + h) * W + w];
    }
}

// V[xi][t][c] (xi stride vs) of the tiles of tile row ty of one image (tiles t0 + tx): the
// 6x6 patch of tile (ty, tx) is the padded plane's rows 4 ty .. 4 ty + 5, columns 4 tx ..
// 4 tx + 5 (past the plane: `zeros`).
template <typename T>
void input_tiles(const T* xt, int64_t H, int64_t W, int64_t Cp, int64_t ty, int64_t tw, const T* zeros, T* v,
                 int64_t t0, int64_t vs) {
    const int64_t Hp = H + 2, Wp = W + 2;
    for (int64_t tx = 0; tx < tw; ++tx) {
        const T* src[6][6];
        for (int a = 0; a < 6; ++a)
            for (int b = 0; b < 6; ++b) {
                const int64_t h = 4 * ty + a, w = 4 * tx + b;
                src[a][b] = h < Hp && w < Wp ? xt + (h * Wp + w) * Cp : zeros;
            }
        T* out = v + (t0 + tx) * Cp;
#pragma omp simd
        for (int64_t c = 0; c < Cp; ++c) {
            T t[6][6];  // B^T d: t[i][q] for patch column q
            for (int q = 0; q < 6; ++q) {
                const T d0 = src[0][q][c], d1 = src[1][q][c], d2 = src[2][q][c], d3 = src[3][q][c],
                        d4 = src[4][q][c], d5 = src[5][q][c];
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
                T* o = out + 6 * i * vs + c;
                o[0] = T(4) * d0 - T(5) * d2 + d4;
                o[vs] = a1 + a2;
                o[2 * vs] = a1 - a2;
                o[3 * vs] = b1 + b2;
                o[4 * vs] = b1 - b2;
                o[5 * vs] = T(4) * d1 - T(5) * d3 + d5;
            }
        }
    }
}

// Z[xi][t][k] (xi stride zs) of tile row ty of one image: A d A^T of the 4x4 patch of gy at
// rows 4 ty .. 4 ty + 3, columns 4 tx .. 4 tx + 3 (the padded plane's + 1; past the image: zeros).
// A (6 x 4) has the rows [1 0 0 0], [1 1 1 1], [1 -1 1 -1], [1 2 4 8], [1 -2 4 -8], [0 0 0 1].
template <typename T>
void grad_tiles(const T* gt, int64_t H, int64_t W, int64_t Kp, int64_t ty, int64_t tw, const T* zeros, T* z,
                int64_t t0, int64_t zs) {
    const int64_t Wp = W + 2;
    for (int64_t tx = 0; tx < tw; ++tx) {
        const T* src[4][4];
        for (int a = 0; a < 4; ++a)
            for (int b = 0; b < 4; ++b) {
                const int64_t h = 4 * ty + a, w = 4 * tx + b;
                src[a][b] = h < H && w < W ? gt + ((h + 1) * Wp + w + 1) * Kp : zeros;
            }
        T* out = z + (t0 + tx) * Kp;
#pragma omp simd
        for (int64_t k = 0; k < Kp; ++k) {
            T t[6][4];  // A d: t[i][q] for patch column q
            for (int q = 0; q < 4; ++q) {
                const T d0 = src[0][q][k], d1 = src[1][q][k], d2 = src[2][q][k], d3 = src[3][q][k];
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
                T* r = out + 6 * i * zs + k;
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

// m[r][c] += sum_t z[t][r] v[t][c] for the nk rows of one block, every column c < Cp.
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

template <typename T>
std::vector<T>& scratch() {
    thread_local std::vector<T> buf;  // kept between calls, grown when needed (never shrinks)
    return buf;
}

}  // namespace

template <typename T>
void winograd4_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W) {
    const int64_t th = (H + 3) / 4, tw = (W + 3) / 4, per_image = th * tw;
    const int64_t kblocks = (K + kRows - 1) / kRows;
    const int64_t Cp = round_up(C, 16), Kp = round_up(kblocks * kRows, 16);
    const int64_t plane = (H + 2) * (W + 2);
    const int64_t image_floats = kXi * per_image * (Cp + Kp) + plane * (Cp + Kp);
    const int64_t group = std::clamp<int64_t>(kGroupBytes / (image_floats * int64_t(sizeof(T))), 1, N);
    const int64_t gtiles = group * per_image;  // tiles of a full group: the xi stride of V and Z
    const int64_t mrows = kblocks * kRows;

    // scratch: M (36 x mrows x Cp), V (36 x gtiles x Cp), Z (36 x gtiles x Kp), the planes of x
    // and of gy (group x plane x Cp, Kp), a row of zeros
    const int64_t m_size = kXi * mrows * Cp, v_size = kXi * gtiles * Cp, z_size = kXi * gtiles * Kp;
    const int64_t xp_size = group * plane * Cp, gp_size = group * plane * Kp, zero_size = std::max(Cp, Kp);
    std::vector<T>& buf = scratch<T>();
    const size_t need = static_cast<size_t>(m_size + v_size + z_size + xp_size + gp_size + zero_size + 16);
    if (buf.size() < need) buf.resize(need);
    T* const m = buf.data() + (64 - reinterpret_cast<std::uintptr_t>(buf.data()) % 64) % 64 / sizeof(T);
    T* const v = m + m_size;
    T* const z = v + v_size;
    T* const xp = z + z_size;
    T* const gp = xp + xp_size;
    T* const zeros = gp + gp_size;
    std::fill(zeros, zeros + zero_size, T(0));
    std::fill(m, m + m_size, T(0));

#pragma omp parallel
    {
        for (int64_t n0 = 0; n0 < N; n0 += group) {
            const int64_t ng = std::min(group, N - n0), tiles = ng * per_image;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < 2 * ng; ++i) {  // x or gy of one image: its planes, then V or Z of its tiles
                const int64_t n = i / 2, t0 = n * per_image;
                if (i % 2 == 0) {
                    T* planes = xp + n * plane * Cp;
                    padded_planes(x + (n0 + n) * C * H * W, planes, C, Cp, H, W);
                    for (int64_t ty = 0; ty < th; ++ty)
                        input_tiles(planes, H, W, Cp, ty, tw, zeros, v, t0 + ty * tw, gtiles * Cp);
                } else {
                    T* planes = gp + n * plane * Kp;
                    padded_planes(gy + (n0 + n) * K * H * W, planes, K, Kp, H, W);
                    for (int64_t ty = 0; ty < th; ++ty)
                        grad_tiles(planes, H, W, Kp, ty, tw, zeros, z, t0 + ty * tw, gtiles * Kp);
                }
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < kXi * kblocks; ++task) {  // M[xi][rows of kb] += Z[xi] V[xi]^T
                const int64_t xi = task / kblocks, kb = task % kblocks;
                const int nk = static_cast<int>(std::min<int64_t>(kRows, K - kb * kRows));
                gemm_rows(z + xi * gtiles * Kp + kb * kRows, v + xi * gtiles * Cp, m + (xi * mrows + kb * kRows) * Cp,
                          tiles, Kp, Cp, nk);
            }
        }
        // gw[k, c] = G^T M[k, c] G; G^T rows: [1/4 -1/6 -1/6 1/24 1/24 0], [0 -1/6 1/6 1/12 -1/12 0],
        // [0 -1/6 -1/6 1/6 1/6 1] (in double: 36 values per filter, a small cost)
#pragma omp for schedule(static)
        for (int64_t kc = 0; kc < K * C; ++kc) {
            const int64_t k = kc / C, c = kc % C;
            const double q = 1.0 / 4, s = 1.0 / 6, e = 1.0 / 12, f = 1.0 / 24;
            double mm[6][6];
            for (int xi = 0; xi < kXi; ++xi) mm[xi / 6][xi % 6] = static_cast<double>(m[(xi * mrows + k) * Cp + c]);
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
