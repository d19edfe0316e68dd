// conv3x3_act: conv3x3 + bias + activation in one pass (the NumPy reference, the composition
// of conv3x3 and the activation, is in pycnn/ops/conv.py).
//
// Forward: the convolution kernels (conv3x3.cpp, conv3x3_winograd.cpp) take an Epilogue
// (conv3x3.hpp) that applies the activation to each stretch of output right after it is
// stored, while it is in L1: z = conv(x, w) + b never travels to memory on its own.
// Backward: gz = g * act'(z) here (one pass over g and the saved array), then the conv
// backward of the chosen algorithm on gz.
//
// What is saved for the backward pass (pycnn/ops/cpp_backend.py decides, conv3x3.cpp checks):
//   relu, leaky_relu with slope >= 0, prelu with every slope > 0: the output y alone.  y > 0
//     exactly when z > 0, so the mask is y > 0; prelu's weight gradient sum_{z<=0} g*z is
//     (sum_{y<=0} g*y) / a[k], one division per channel.
//   elu (any alpha): the pre-activation z.  Its derivative alpha*exp(z) can't be read off
//     y = alpha*expm1(z): y + alpha cancels as y -> -alpha (z = -20: y rounds to -alpha in
//     float32, and y + alpha = 0 where alpha*exp(z) = 2e-9).
//   leaky_relu with slope < 0, prelu with a slope <= 0: y >= 0 on both branches (or y = 0 on
//     the negative one), the output no longer tells the branches apart or gives z back, so
//     the pre-activation z is kept.
// Shapes: g, gz, saved are (N, K, P) with P = H * W; gprelu is (K,).
#include "conv3x3.hpp"

#include <omp.h>

#include <cstdint>
#include <vector>

namespace pycnn {
namespace conv {

template <typename T>
void activation_grad(const Epilogue<T>& ep, const T* saved, bool saved_is_pre, const T* g, T* gz, T* gprelu,
                     int64_t N, int64_t K, int64_t P) {
    const int64_t rows = N * K;
    std::vector<double> row_sum(ep.act == Activation::Prelu ? static_cast<size_t>(rows) : 0);
    double* row_sum_p = row_sum.data();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t k = r % K;
        const T* s = saved + r * P;
        const T* gr = g + r * P;
        T* out = gz + r * P;
        switch (ep.act) {
            case Activation::None:
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) out[p] = gr[p];
                break;
            case Activation::Relu:
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) out[p] = s[p] > T(0) ? gr[p] : T(0);
                break;
            case Activation::LeakyRelu: {
                const T slope = ep.slope;
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) out[p] = s[p] > T(0) ? gr[p] : gr[p] * slope;
                break;
            }
            case Activation::Prelu: {  // s is z or y (a > 0); per-row double sums, added in order of n below
                const T a = ep.prelu[k];
                double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                for (int64_t p = 0; p < P; ++p) {
                    const bool pos = s[p] > T(0);
                    out[p] = pos ? gr[p] : gr[p] * a;
                    acc += pos ? 0.0 : static_cast<double>(gr[p]) * static_cast<double>(s[p]);
                }
                row_sum_p[r] = acc;
                break;
            }
            case Activation::Elu: {  // s is z (the binding refuses y: see the top of the file)
                const T alpha = ep.alpha;
#pragma omp simd
                for (int64_t p = 0; p < P; ++p) {
                    const T z = s[p];
                    const T neg = gr[p] * alpha * exp_nonpositive<T>(z > T(0) ? T(0) : z);
                    out[p] = z > T(0) ? gr[p] : neg;
                }
                break;
            }
        }
    }
    if (ep.act == Activation::Prelu && gprelu) {
        for (int64_t k = 0; k < K; ++k) {
            double acc = 0.0;
            for (int64_t n = 0; n < N; ++n) acc += row_sum_p[n * K + k];
            gprelu[k] = static_cast<T>(saved_is_pre ? acc : acc / static_cast<double>(ep.prelu[k]));  // y = a z
        }
    }
}

template void activation_grad<float>(const Epilogue<float>&, const float*, bool, const float*, float*, float*,
                                     int64_t, int64_t, int64_t);
template void activation_grad<double>(const Epilogue<double>&, const double*, bool, const double*, double*, double*,
                                      int64_t, int64_t, int64_t);

}  // namespace conv
}  // namespace pycnn
