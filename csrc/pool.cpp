// 2x2 pooling, stride 2: maxpool2x2 and avgpool2x2, forward and backward, float32 and float64.
// The NumPy references in pycnn/ops/pool.py are the spec:
//   x is (N, C, H, W), y is (N, C, H/2, W/2) (floor); an odd last row / column is not pooled
//   and gets a zero gradient.  Max: the first maximum of the window in row-major order wins
//   (top-left, top-right, bottom-left, bottom-right); a NaN wins over any number (the first
//   NaN).  The forward pass stores the winner (0..3, uint8 per output) for the backward pass.
//
// Every loop runs over the N*C planes (OpenMP, static), each plane row by row.  float32
// max-pooling has AVX-512 code (16 windows per step: even / odd columns split with two-source
// permutes, a NaN-free fast path; W == 16 takes two output rows per step); the other loops
// are plain C++ that gcc vectorises.  These kernels
// are memory-bound: the limit is a copy of the same bytes (bench/test_conv_pool.py).
#include "common.hpp"

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PYCNN_POOL_AVX512 1
#else
#define PYCNN_POOL_AVX512 0
#endif

namespace {

using std::int64_t;
using std::uint8_t;

// Whether T's rows take the AVX-512 path: float32 in the AVX-512 build.
template <typename T>
constexpr bool kSimdRows = PYCNN_POOL_AVX512 && std::is_same_v<T, float>;

// The AVX-512 dispatch of max pooling's row loops (forward and backward), inside the loop over
// the output rows h of a plane: TWO_ROWS takes rows h and h + 1 at once where W == 16 (16
// contiguous outputs), ONE_ROW row h otherwise; other types and builds fall through to the
// plain loop (discarded by `if constexpr`: the calls are dependent, so they need no
// declaration there).  A macro for the loop's own `++h; continue;`: a function returning the
// rows it took made the W == 16 backward pass 25-35% slower (its calls were not inlined).
#define PYCNN_MAXPOOL_SIMD_ROWS(TWO_ROWS, ONE_ROW) \
    if constexpr (kSimdRows<T>) {                  \
        if (W == 16 && h + 1 < Ho) {               \
            TWO_ROWS;                              \
            ++h;                                   \
            continue;                              \
        }                                          \
        ONE_ROW;                                   \
        continue;                                  \
    }

// Does `b` replace the current best `a`?  Greater, or NaN over a number.
template <typename T>
inline bool beats(T b, T a) {
    return b > a || (b != b && a == a);
}


#if PYCNN_POOL_AVX512
// float32 max-pooling rows, 16 windows per step: the two input rows are loaded as 32 floats
// each and split into even / odd columns with a two-source permute; the tail is masked.
const __m512i kEven = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
const __m512i kOdd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
const __m512i kLo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
const __m512i kHi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// b beats a: b > a, or b is NaN and a is not.
inline __mmask16 beats_ps(__m512 b, __m512 a) {
    return _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) |
           (_mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q));
}

// 16 windows: top-left / top-right from the 32 floats (t0, t1), bottom from (b0, b1).
inline void maxpool16_forward(__m512 t0, __m512 t1, __m512 b0, __m512 b1, __mmask16 m, float* y, uint8_t* arg) {
    __m512 best = _mm512_permutex2var_ps(t0, kEven, t1);
    const __m512 tr = _mm512_permutex2var_ps(t0, kOdd, t1);
    const __m512 bl = _mm512_permutex2var_ps(b0, kEven, b1);
    const __m512 br = _mm512_permutex2var_ps(b0, kOdd, b1);
    __m512i idx = _mm512_setzero_si512();
    const bool any_nan = (_mm512_cmp_ps_mask(best, tr, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(bl, br, _CMP_UNORD_Q)) != 0;
    if (!any_nan) {  // the common case: strictly greater replaces (the first maximum wins)
        __mmask16 k = _mm512_cmp_ps_mask(tr, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, k, tr);
        idx = _mm512_mask_mov_epi32(idx, k, _mm512_set1_epi32(1));
        k = _mm512_cmp_ps_mask(bl, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, k, bl);
        idx = _mm512_mask_mov_epi32(idx, k, _mm512_set1_epi32(2));
        k = _mm512_cmp_ps_mask(br, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, k, br);
        idx = _mm512_mask_mov_epi32(idx, k, _mm512_set1_epi32(3));
    } else {
        __mmask16 k = beats_ps(tr, best);
        best = _mm512_mask_mov_ps(best, k, tr);
        idx = _mm512_mask_mov_epi32(idx, k, _mm512_set1_epi32(1));
        k = beats_ps(bl, best);
        best = _mm512_mask_mov_ps(best, k, bl);
        idx = _mm512_mask_mov_epi32(idx, k, _mm512_set1_epi32(2));
        k = beats_ps(br, best);
        best = _mm512_mask_mov_ps(best, k, br);
        idx = _mm512_mask_mov_epi32(idx, k, _mm512_set1_epi32(3));
    }
    _mm512_mask_storeu_ps(y, m, best);
    _mm512_mask_cvtepi32_storeu_epi8(arg, m, idx);
}

void maxpool_row_forward(const float* r0, const float* r1, float* y, uint8_t* arg, int64_t Wo) {
    for (int64_t w = 0; w < Wo; w += 16) {
        const int64_t n = Wo - w;
        const __mmask16 m = tail_mask(n), mlo = tail_mask(2 * n), mhi = tail_mask(2 * n - 16 > 0 ? 2 * n - 16 : 0);
        maxpool16_forward(_mm512_maskz_loadu_ps(mlo, r0 + 2 * w), _mm512_maskz_loadu_ps(mhi, r0 + 2 * w + 16),
                          _mm512_maskz_loadu_ps(mlo, r1 + 2 * w), _mm512_maskz_loadu_ps(mhi, r1 + 2 * w + 16), m,
                          y + w, arg + w);
    }
}

// W == 16: one step covers two output rows (input rows r, r+W, r+2W, r+3W; 16 contiguous outputs).
inline void maxpool_two_rows16_forward(const float* r, float* y, uint8_t* arg) {
    maxpool16_forward(_mm512_loadu_ps(r), _mm512_loadu_ps(r + 32), _mm512_loadu_ps(r + 16), _mm512_loadu_ps(r + 48),
                      __mmask16(0xFFFF), y, arg);
}

// The 4 routed gradients e0..e3 (16 windows) interleaved into the two input rows.
inline void maxpool16_backward(__m512 gv, __m512i idx, float* t0, float* t1, float* b0, float* b1, __mmask16 mlo,
                               __mmask16 mhi) {
    const __m512 e0 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(0)), gv);
    const __m512 e1 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(1)), gv);
    const __m512 e2 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(2)), gv);
    const __m512 e3 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(3)), gv);
    _mm512_mask_storeu_ps(t0, mlo, _mm512_permutex2var_ps(e0, kLo, e1));
    _mm512_mask_storeu_ps(t1, mhi, _mm512_permutex2var_ps(e0, kHi, e1));
    _mm512_mask_storeu_ps(b0, mlo, _mm512_permutex2var_ps(e2, kLo, e3));
    _mm512_mask_storeu_ps(b1, mhi, _mm512_permutex2var_ps(e2, kHi, e3));
}

void maxpool_row_backward(const float* g, const uint8_t* arg, float* r0, float* r1, int64_t Wo) {
    for (int64_t w = 0; w < Wo; w += 16) {
        const int64_t n = Wo - w;
        const __mmask16 m = tail_mask(n), mlo = tail_mask(2 * n), mhi = tail_mask(2 * n - 16 > 0 ? 2 * n - 16 : 0);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + w);
        const __m512i idx = _mm512_maskz_cvtepu8_epi32(m, _mm_maskz_loadu_epi8(m, arg + w));
        maxpool16_backward(gv, idx, r0 + 2 * w, r0 + 2 * w + 16, r1 + 2 * w, r1 + 2 * w + 16, mlo, mhi);
    }
}

inline void maxpool_two_rows16_backward(const float* g, const uint8_t* arg, float* r) {
    const __m512 gv = _mm512_loadu_ps(g);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(arg));
    const __m512i idx = _mm512_maskz_cvtepu8_epi32(__mmask16(0xFFFF), bytes);  // (maskz: no gcc 12 warning)
    maxpool16_backward(gv, idx, r, r + 32, r + 16, r + 48, __mmask16(0xFFFF), __mmask16(0xFFFF));
}

#endif

template <typename T>
void maxpool_forward(const T* x, T* y, uint8_t* arg, int64_t planes, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static) if (planes * H * W >= pycnn::kParallelMinElements)
    for (int64_t pl = 0; pl < planes; ++pl) {
        for (int64_t h = 0; h < Ho; ++h) {
            const T* r0 = x + (pl * H + 2 * h) * W;
            const T* r1 = r0 + W;
            T* yr = y + (pl * Ho + h) * Wo;
            uint8_t* ar = arg + (pl * Ho + h) * Wo;
            PYCNN_MAXPOOL_SIMD_ROWS(maxpool_two_rows16_forward(r0, yr, ar), maxpool_row_forward(r0, r1, yr, ar, Wo))
#pragma omp simd
            for (int64_t w = 0; w < Wo; ++w) {
                T best = r0[2 * w];
                uint8_t idx = 0;
                const T b = r0[2 * w + 1], c = r1[2 * w], d = r1[2 * w + 1];
                if (beats(b, best)) { best = b; idx = 1; }
                if (beats(c, best)) { best = c; idx = 2; }
                if (beats(d, best)) { best = d; idx = 3; }
                yr[w] = best;
                ar[w] = idx;
            }
        }
    }
}

// gx (overwritten, every element) from gy and the winners.
template <typename T>
void maxpool_backward(const T* gy, const uint8_t* arg, T* gx, int64_t planes, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static) if (planes * H * W >= pycnn::kParallelMinElements)
    for (int64_t pl = 0; pl < planes; ++pl) {
        for (int64_t h = 0; h < Ho; ++h) {
            const T* g = gy + (pl * Ho + h) * Wo;
            const uint8_t* a = arg + (pl * Ho + h) * Wo;
            T* r0 = gx + (pl * H + 2 * h) * W;
            T* r1 = r0 + W;
            if (W & 1) r0[W - 1] = r1[W - 1] = T(0);
            PYCNN_MAXPOOL_SIMD_ROWS(maxpool_two_rows16_backward(g, a, r0), maxpool_row_backward(g, a, r0, r1, Wo))
#pragma omp simd
            for (int64_t w = 0; w < Wo; ++w) {
                const T gv = g[w];
                const uint8_t i = a[w];
                r0[2 * w] = i == 0 ? gv : T(0);
                r0[2 * w + 1] = i == 1 ? gv : T(0);
                r1[2 * w] = i == 2 ? gv : T(0);
                r1[2 * w + 1] = i == 3 ? gv : T(0);
            }
        }
        if (H & 1) std::memset(gx + (pl * H + H - 1) * W, 0, sizeof(T) * W);
    }
}

template <typename T>
void avgpool_forward(const T* x, T* y, int64_t planes, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static) if (planes * H * W >= pycnn::kParallelMinElements)
    for (int64_t pl = 0; pl < planes; ++pl) {
        for (int64_t h = 0; h < Ho; ++h) {
            const T* r0 = x + (pl * H + 2 * h) * W;
            const T* r1 = r0 + W;
            T* yr = y + (pl * Ho + h) * Wo;
#pragma omp simd
            for (int64_t w = 0; w < Wo; ++w)  // the reference's order: ((a + b) + c) + d, then / 4
                yr[w] = (((r0[2 * w] + r0[2 * w + 1]) + r1[2 * w]) + r1[2 * w + 1]) * T(0.25);
        }
    }
}

template <typename T>
void avgpool_backward(const T* gy, T* gx, int64_t planes, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static) if (planes * H * W >= pycnn::kParallelMinElements)
    for (int64_t pl = 0; pl < planes; ++pl) {
        for (int64_t h = 0; h < Ho; ++h) {
            const T* g = gy + (pl * Ho + h) * Wo;
            T* r0 = gx + (pl * H + 2 * h) * W;
            T* r1 = r0 + W;
#pragma omp simd
            for (int64_t w = 0; w < Wo; ++w) {
                const T q = g[w] * T(0.25);
                r0[2 * w] = q;
                r0[2 * w + 1] = q;
                r1[2 * w] = q;
                r1[2 * w + 1] = q;
            }
            if (W & 1) r0[W - 1] = r1[W - 1] = T(0);
        }
        if (H & 1) std::memset(gx + (pl * H + H - 1) * W, 0, sizeof(T) * W);
    }
}

// ------------------------------------------------------------------------- bindings
using pycnn::as_array;
using pycnn::as_array_like;
using pycnn::as_float_array;
using pycnn::shape_str;

struct PoolDims { int64_t planes, H, W; };

PoolDims pool_dims(const char* fn, const py::array& x) {
    if (x.ndim() != 4 || x.shape(2) < 2 || x.shape(3) < 2 || x.shape(0) == 0 || x.shape(1) == 0) {
        throw py::value_error(std::string(fn) + ": x must be (N, C, H, W) with N, C >= 1 and H, W >= 2, got shape " +
                              shape_str(x));
    }
    return {x.shape(0) * x.shape(1), x.shape(2), x.shape(3)};
}

void require_pooled(const char* fn, const char* name, const py::array& a, const py::array& x) {
    if (a.ndim() != 4 || a.shape(0) != x.shape(0) || a.shape(1) != x.shape(1) || a.shape(2) != x.shape(2) / 2 ||
        a.shape(3) != x.shape(3) / 2) {
        throw py::value_error(std::string(fn) + ": " + name + " must have shape (" + std::to_string(x.shape(0)) + ", " +
                              std::to_string(x.shape(1)) + ", " + std::to_string(x.shape(2) / 2) + ", " +
                              std::to_string(x.shape(3) / 2) + ") (x pooled 2x2), got " + shape_str(a));
    }
}

py::array as_argmax(const char* fn, const py::object& obj, const py::array& x, bool writeable) {
    py::array a = as_array(fn, "argmax", obj, writeable);
    if (!a.dtype().equal(py::dtype::of<uint8_t>())) {
        throw py::type_error(std::string(fn) + ": argmax must be uint8, got " + pycnn::dtype_name(a));
    }
    require_pooled(fn, "argmax", a, x);
    return a;
}

// A pooling call: `full` (N, C, H, W) and `pooled` (like full pooled 2x2), checked; the forward
// passes read full (x) and write pooled (y), the backward passes read pooled (grad_y) and write
// full (grad_x).
struct PoolCall {
    const char* fn;
    bool forward;
    py::array full, pooled;
    PoolDims d;

    PoolCall(const char* fn_, bool forward_, const py::object& full_obj, const py::object& pooled_obj)
        : fn(fn_), forward(forward_) {
        const char* full_name = forward ? "x" : "grad_x";
        const char* pooled_name = forward ? "y" : "grad_y";
        full = as_float_array(fn, full_name, full_obj, !forward);
        d = pool_dims(fn, full);
        pooled = as_array_like(fn, pooled_name, pooled_obj, full_name, full, forward);
        require_pooled(fn, pooled_name, pooled, full);
    }

    // kernel(in, out, d) with T pointers (in: x or grad_y; out: y or grad_x), the GIL released.
    template <class Kernel>
    void run(Kernel kernel) {
        pycnn::dispatch_float(full, [&](auto zero) {
            using T = decltype(zero);
            const T* in = pycnn::data_of<T>(forward ? full : pooled);
            T* out = pycnn::mutable_data_of<T>(forward ? pooled : full);
            py::gil_scoped_release nogil;
            kernel(in, out, d);
        });
    }
};

void define(py::module_& m) {
    m.def(
        "maxpool2x2_forward",
        [](const py::object& x_obj, const py::object& y_obj, const py::object& arg_obj) {
            PoolCall c("maxpool2x2_forward", true, x_obj, y_obj);
            py::array arg = as_argmax(c.fn, arg_obj, c.full, true);
            auto* ap = static_cast<uint8_t*>(arg.mutable_data());
            c.run([ap](auto xp, auto yp, const PoolDims& d) { maxpool_forward(xp, yp, ap, d.planes, d.H, d.W); });
        },
        py::arg("x"), py::arg("y"), py::arg("argmax"),
        "x (N, C, H, W) -> y (N, C, H//2, W//2) and argmax (uint8, same shape as y: 0..3, the winner of each "
        "window in row-major order; first maximum wins, NaN wins).");
    m.def(
        "maxpool2x2_backward",
        [](const py::object& g_obj, const py::object& arg_obj, const py::object& gx_obj) {
            PoolCall c("maxpool2x2_backward", false, gx_obj, g_obj);
            const py::array arg = as_argmax(c.fn, arg_obj, c.full, false);
            const auto* ap = static_cast<const uint8_t*>(arg.data());
            c.run([ap](auto gp, auto gxp, const PoolDims& d) { maxpool_backward(gp, ap, gxp, d.planes, d.H, d.W); });
        },
        py::arg("grad_y"), py::arg("argmax"), py::arg("grad_x"),
        "grad_x (N, C, H, W), overwritten: grad_y routed to the winner of each window, 0 elsewhere.");
    m.def(
        "avgpool2x2_forward",
        [](const py::object& x_obj, const py::object& y_obj) {
            PoolCall("avgpool2x2_forward", true, x_obj, y_obj).run([](auto xp, auto yp, const PoolDims& d) {
                avgpool_forward(xp, yp, d.planes, d.H, d.W);
            });
        },
        py::arg("x"), py::arg("y"), "x (N, C, H, W) -> y (N, C, H//2, W//2): the mean of each 2x2 window.");
    m.def(
        "avgpool2x2_backward",
        [](const py::object& g_obj, const py::object& gx_obj) {
            PoolCall("avgpool2x2_backward", false, gx_obj, g_obj).run([](auto gp, auto gxp, const PoolDims& d) {
                avgpool_backward(gp, gxp, d.planes, d.H, d.W);
            });
        },
        py::arg("grad_y"), py::arg("grad_x"),
        "grad_x (N, C, H, W), overwritten: grad_y / 4 on each window, 0 where not pooled.");
}

const pycnn::Bindings bindings(define);

}  // namespace
