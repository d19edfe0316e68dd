// Shared pieces of the conv3x3 kernels (conv3x3.cpp: direct; conv3x3_winograd.cpp: Winograd).
//
// Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,), y is (N, K, H, W); P = H * W.
// Tap t = 3 * i + j of the 3x3 filter reads x at (h + i - 1, w + j - 1) (zero padding 1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vecmath.hpp"

namespace pycnn {
namespace conv {

using std::int64_t;

// ------------------------------------------------------------------ the fused epilogue
// conv3x3_act (conv3x3_act.cpp) applies an activation where the convolution stores its
// output, while the stored values are still in L1: z = conv(x, w) + b, y = act(z).
//   relu        y = max(z, 0)
//   leaky_relu  y = z > 0 ? z : slope * z
//   prelu       y = z > 0 ? z : prelu[k] * z          (one slope per output channel k)
//   elu         y = z > 0 ? z : alpha * expm1(z)
// Where `pre` is set, z is also kept there (N, K, H, W) for the backward pass.
enum class Activation { None, Relu, LeakyRelu, Prelu, Elu };

template <typename T>
struct Epilogue {
    Activation act = Activation::None;
    T slope = T(0);
    T alpha = T(1);
    const T* prelu = nullptr;  // (K,)
    T* pre = nullptr;          // (N, K, H, W) or null

    bool active() const { return act != Activation::None || pre != nullptr; }

    // y[0 .. n): n consecutive outputs of channel k, at flat index `at` of the (N, K, H, W) output.
    void apply(T* y, int64_t at, int64_t k, int64_t n) const {
        if (pre) std::memcpy(pre + at, y, sizeof(T) * static_cast<size_t>(n));
        switch (act) {
            case Activation::None:
                return;
            case Activation::Relu:
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) y[i] = y[i] < T(0) ? T(0) : y[i];  // NaN stays NaN, like np.maximum
                return;
            case Activation::LeakyRelu:
            case Activation::Prelu: {
                const T s = act == Activation::Prelu ? prelu[k] : slope;
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) y[i] = y[i] > T(0) ? y[i] : y[i] * s;
                return;
            }
            case Activation::Elu: {
                const T a = alpha;
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                    const T z = y[i];
                    const T neg = a * expm1_nonpositive<T>(z > T(0) ? T(0) : z);
                    y[i] = z > T(0) ? z : neg;
                }
                return;
            }
        }
    }
};

// The gradient of the activation: gz = g * act'(z), from `saved` = z (saved_is_pre) or
// y = act(z) (the output: enough for relu, leaky_relu with slope >= 0 and prelu with slopes
// > 0, where y > 0 exactly when z > 0; elu always needs z, conv3x3_act.cpp says why).  prelu: gprelu[k] = sum over n, p with z <= 0 of g * z (overwritten; may be null;
// from y: that sum with y in place of z, divided by the slope).  Arrays are (N, K, P), gprelu is (K,).
template <typename T>
void activation_grad(const Epilogue<T>& ep, const T* saved, bool saved_is_pre, const T* g, T* gz, T* gprelu,
                     int64_t N, int64_t K, int64_t P);

// Direct convolution, float32 (AVX-512 micro-kernels where compiled with -mavx512f) and a
// plain path for float64.  All outputs are overwritten, never accumulated.
//   forward:      y = conv(x, w) + b                      (b may be null)
//   grad_input:   gx = conv(gy, flip(w)^T)                 (gy is (N, K, H, W), gx is (N, C, H, W))
//   grad_weight:  gw[k, c, t] = sum_{n, p} gy[n, k, p] * x[n, c, p + off(t)]
//   grad_bias:    gb[k] = sum_{n, p} gy[n, k, p]
template <typename T>
void direct_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W,
                    const Epilogue<T>& ep = Epilogue<T>());
template <typename T>
void direct_grad_input(const T* gy, const T* w, T* gx, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W);
template <typename T>
void direct_grad_weight(const T* x, const T* gy, T* gw, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W);
template <typename T>
void grad_bias(const T* gy, T* gb, int64_t N, int64_t K, int64_t P);

// Winograd F(2x2, 3x3) (conv3x3_winograd.cpp): forward and grad_input (a Winograd conv with
// the flipped, transposed filter).  grad_weight uses direct_grad_weight.
template <typename T>
void winograd_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W,
                      const Epilogue<T>& ep = Epilogue<T>());
template <typename T>
void winograd_grad_input(const T* gy, const T* w, T* gx, int64_t N, int64_t C, int64_t K, int64_t H, int64_t W);

// The whole backward pass of either algorithm ("winograd": grad_x by Winograd); gx, gw, gb
// may each be null (not computed).
template <typename T>
void backward(bool winograd, const T* x, const T* w, const T* gy, T* gx, T* gw, T* gb, int64_t N, int64_t C,
              int64_t K, int64_t H, int64_t W);

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

}  // namespace conv
}  // namespace pycnn
