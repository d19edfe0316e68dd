// Shared pieces of the conv3x3 kernels (conv3x3.cpp: direct; conv3x3_winograd.cpp: Winograd
// F(2x2, 3x3); conv3x3_winograd4.cpp: Winograd F(4x4, 3x3);
// conv3x3_bindings.cpp: the Python bindings of conv3x3 and conv3x3_act).
//
// Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,), y is (N, K, H, W); P = H * W.
// Tap t = 3 * i + j of the 3x3 filter reads x at (h + i - 1, w + j - 1) (zero padding 1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "activation_kernels.hpp"

namespace pycnn {
namespace conv {

using std::int64_t;

// ------------------------------------------------------------------ the fused epilogue
// conv3x3_act applies an activation where the convolution stores its output, while the
// stored values are still in L1: z = conv(x, w) + b, y = act(z).  The activation is one of
// activation.hpp's conv activations ("relu", "leaky_relu", "prelu", "elu", ...): its
// row function runs the same per-element code as its elementwise kernel.
// Where `pre` is set, z is also kept there (N, K, H, W) for the backward pass.
template <typename T>
struct Epilogue {
    act::RowForward<T> activation = nullptr;  // null: none
    act::Params<T> params;                    // prelu: params.prelu holds the K slopes
    T* pre = nullptr;                         // (N, K, H, W) or null

    bool active() const { return activation != nullptr || pre != nullptr; }

    // y[0 .. n): n consecutive outputs of channel k, at flat index `at` of the (N, K, H, W) output.
    void apply(T* y, int64_t at, int64_t k, int64_t n) const {
        if (pre) std::memcpy(pre + at, y, sizeof(T) * static_cast<size_t>(n));
        if (activation) activation(y, y, n, params.channel(k));
    }
};

// The forward kernel of each algorithm, float32 (SIMD micro-kernels, simd.hpp) and float64
// (plain loops, for gradient checks); all outputs are overwritten, never accumulated:
//   y = conv(x, w) + b (b may be null), then the epilogue ep
//   direct_forward     the direct loop nest                        (conv3x3.cpp)
//   winograd_forward   Winograd F(2x2, 3x3): 16 multiplies per 2x2 outputs and channel
//                      instead of 36                                (conv3x3_winograd.cpp)
//   winograd4_forward  Winograd F(4x4, 3x3): 36 multiplies per 4x4 outputs and channel
//                      instead of 144, a float32 error about 5x the direct kernel's (the file
//                      says what was measured)                     (conv3x3_winograd4.cpp)
template <typename T>
void direct_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W,
                    const Epilogue<T>& ep = Epilogue<T>());
template <typename T>
void winograd_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W,
                      const Epilogue<T>& ep = Epilogue<T>());
template <typename T>
void winograd4_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H,
                       int64_t W, const Epilogue<T>& ep = Epilogue<T>());

// grad_weight: gw[k, c, t] = sum_{n, p} gy[n, k, p] * x[n, c, p + off(t)]   (gy is (N, K, H, W))
//   direct_grad_weight     the direct sums                          (conv3x3_grad_weight.cpp)
//   winograd4_grad_weight  the adjoint of winograd4_forward: sum over the 4x4 output tiles of
//                          G^T [(A gy A^T) . (B^T x B)] G, 36 multiplies per tile and channel
//                          pair instead of 144              (conv3x3_winograd4_grad_weight.cpp)
// grad_bias: gb[k] = sum_{n, p} gy[n, k, p]                                       (conv3x3.cpp)
template <typename T>
void direct_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W);
template <typename T>
void winograd4_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W);
template <typename T>
void grad_bias(const T* gy, T* gb, int64_t N, int64_t K, int64_t P);

// The explicit instantiations of a kernel `fn` (a forward kernel above, or a grad_weight one)
// for float32 and float64, in its file.
#define PYCNN_CONV_FORWARD_INSTANTIATE(T, fn) \
    template void fn<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, const Epilogue<T>&);
#define PYCNN_CONV_GRAD_WEIGHT_INSTANTIATE(T, fn) \
    template void fn<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t);
#define PYCNN_CONV_INSTANTIATE(kind, fn) kind(float, fn) kind(double, fn)

// Non-finite outputs of the Winograd kernels.  Their transforms mix every value of a tile
// into every other: one inf input makes NaN (inf - inf) over a whole 4x4 or 6x6 tile, and
// inputs near the float's limit overflow in the transforms where the direct sums do not.  So
// both Winograd kernels add v * 0 over what they compute (0 for finite values, NaN once one
// is inf or NaN; before the epilogue, as relu would hide a NaN): F(4x4, 3x3) over its outputs
// inside the output transform loop, F(2x2, 3x3) over its Winograd-domain products M.  Where
// the sum is not 0 the call is computed again by the direct kernel: NaN and inf are then
// where the direct convolution (and PyTorch) puts them.
template <typename T>
inline bool all_finite(const T* a, int64_t n) {
    T probe = T(0);
#pragma omp simd reduction(+ : probe)
    for (int64_t i = 0; i < n; ++i) probe += a[i] * T(0);
    return probe == T(0);
}

// Scratch of a kernel, kept per thread between calls and grown when needed (never shrinks),
// 64-byte aligned: fresh allocations of a few MiB per call cost their page faults.  Each Owner
// (a kernel's tag type) and slot (0 or 1) has its own buffer.
template <class Owner, typename T>
T* thread_scratch(int slot, size_t n) {
    thread_local std::vector<T> buf[2];
    if (buf[slot].size() < n + 64 / sizeof(T)) buf[slot].resize(n + 64 / sizeof(T));
    T* p = buf[slot].data();
    return p + (64 - reinterpret_cast<std::uintptr_t>(p) % 64) % 64 / sizeof(T);
}

// w (K, C, 3, 3) -> (C, K, 3, 3) with each 3x3 filter rotated by 180 degrees: the filter of
// grad_input as a forward convolution from K to C channels.
template <typename T>
std::vector<T> flip_transpose(const T* w, int64_t C, int64_t K) {
    std::vector<T> out(static_cast<size_t>(C * K * 9));
    for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c)
            for (int t = 0; t < 9; ++t) out[(c * K + k) * 9 + t] = w[(k * C + c) * 9 + (8 - t)];
    return out;
}

// ------------------------------------------------------------------ by algorithm
// The algorithms of the bindings (pycnn.ops.registry.Algo: "direct", "winograd", "winograd4").
enum class Algo { Direct, Winograd, Winograd4 };

template <typename T>
void forward(Algo algo, const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H,
             int64_t W, const Epilogue<T>& ep = Epilogue<T>()) {
    if (algo == Algo::Direct) direct_forward<T>(x, w, b, y, N, C, K, H, W, ep);
    else if (algo == Algo::Winograd) winograd_forward<T>(x, w, b, y, N, C, K, H, W, ep);
    else winograd4_forward<T>(x, w, b, y, N, C, K, H, W, ep);
}

// grad_x = conv(gy, flip(w)^T): the forward kernel of the algorithm from K to C channels.
template <typename T>
void grad_x(Algo algo, const T* gy, const T* w, T* gx, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W) {
    const std::vector<T> wt = flip_transpose(w, C, K);  // (C, K, 3, 3)
    forward<T>(algo, gy, wt.data(), nullptr, gx, N, K, C, H, W);
}

// grad_weight (by F(4x4, 3x3) for "winograd4", the adjoint of its forward; directly for the
// others) and grad_bias, each skipped where its output is null.
template <typename T>
void grad_weight(Algo algo, const T* x, const T* gy, T* gw, T* gb, int64_t N, int64_t C, int64_t K, int64_t H,
                 int64_t W) {
    if (gw && algo == Algo::Winograd4) winograd4_grad_weight<T>(x, gy, gw, N, C, K, H, W);
    else if (gw) direct_grad_weight<T>(x, gy, gw, N, C, K, H, W);
    if (gb) grad_bias<T>(gy, gb, N, K, H * W);
}

}  // namespace conv
}  // namespace pycnn
