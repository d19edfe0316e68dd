// The kernels of the activation idiom (activation.hpp), without Python: the parameters, the
// Functor defaults, the flat maps and the row functions (conv3x3.hpp's epilogue includes
// these alone).
#pragma once

#include "kernel_base.hpp"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pycnn {
namespace act {

using std::int64_t;

// The parameters of an activation in the dtype of the arrays.
template <typename T>
struct Params {
    T slope = T(0.01);         // leaky_relu; prelu: the slope of the current channel (channel())
    T alpha = T(1);            // elu
    const T* prelu = nullptr;  // prelu: one slope per channel, `channels` of them
    int64_t channels = 0;

    // The parameters of channel k (prelu: its slope; the others: unchanged).  Resolved once per
    // row or stretch of outputs, so the per-element code reads a scalar.
    Params channel(int64_t k) const {
        Params p = *this;
        if (prelu) p.slope = prelu[k];
        return p;
    }
};

// The parameters of conv3x3_act's arguments (prelu: its `channels` slopes).
template <typename T>
Params<T> make_params(double slope, double alpha, const T* prelu = nullptr, int64_t channels = 0) {
    Params<T> p;
    p.slope = static_cast<T>(slope);
    p.alpha = static_cast<T>(alpha);
    p.prelu = prelu;
    p.channels = channels;
    return p;
}

enum class Scalar { None, Slope, Alpha };

struct Functor {
    static constexpr Scalar kScalar = Scalar::None;
    static constexpr double kScalarDefault = 0.0;
    static constexpr bool kPerChannel = false;
    template <typename T>
    static double weight_grad(T, T) { return 0.0; }
};

// Params of the bindings' scalar argument `value`.
template <class A, typename T>
Params<T> scalar_params(double value) {
    Params<T> p;
    if constexpr (A::kScalar == Scalar::Slope) p.slope = static_cast<T>(value);
    if constexpr (A::kScalar == Scalar::Alpha) p.alpha = static_cast<T>(value);
    return p;
}

// ------------------------------------------------------------------------ kernels
// n elements, C-contiguous.  Loops over fewer than kParallelMinElements run on one thread.

// Each thread works on its own copy of the parameters: read through the shared one, gcc must
// assume the stores to y may change them, reloads them every element and does not vectorise
// (leaky_relu then ran a mispredicted branch per element: 20x slower than relu).
template <class A, typename T>
void map_forward(const T* z, T* y, int64_t n, const Params<T> p) {
#pragma omp parallel if (n >= kParallelMinElements)
    {
        const Params<T> q = p;
#pragma omp for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) y[i] = A::forward(z[i], q);
    }
}

template <class A, typename T>
void map_backward(const T* s, const T* g, T* gi, int64_t n, const Params<T> p) {
#pragma omp parallel if (n >= kParallelMinElements)
    {
        const Params<T> q = p;
#pragma omp for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) gi[i] = A::backward(s[i], g[i], q);
    }
}

// One row (a stretch of one channel, p resolved by channel()), on the calling thread: the
// conv epilogue (z == y: in place) and the per-channel kernels.
template <class A, typename T>
void row_forward(const T* z, T* y, int64_t n, const Params<T>& p) {
    const Params<T> q = p;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = A::forward(z[i], q);
}

// gi = g * act'(z) on one row; returns the row's term of the per-channel weight gradient,
// sum of weight_grad(s, g) in double (0 without one).
template <class A, typename T>
double row_backward(const T* s, const T* g, T* gi, int64_t n, const Params<T>& p) {
    const Params<T> q = p;
    if constexpr (A::kPerChannel) {
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; ++i) {
            gi[i] = A::backward(s[i], g[i], q);
            acc += A::template weight_grad<T>(s[i], g[i]);
        }
        return acc;
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) gi[i] = A::backward(s[i], g[i], q);
        return 0.0;
    }
}

template <typename T>
using RowForward = void (*)(const T* z, T* y, int64_t n, const Params<T>& p);
template <typename T>
using RowBackward = double (*)(const T* s, const T* g, T* gi, int64_t n, const Params<T>& p);

// Arrays viewed as (N, C, S): row r = n*C + c is S contiguous elements of channel c.
template <typename T, class Row>
void rows_forward(Row row, const T* z, T* y, int64_t N, int64_t C, int64_t S, const Params<T>& p) {
    const int64_t rows = N * C;
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) row(z + r * S, y + r * S, S, p.channel(r % C));
}

// gi = g * act'(.) by rows; where gw is not null, gw[c] (overwritten) = the sum over n of the
// row terms of channel c (each row sums into its own double, the rows of a channel are added
// in order of n: the result does not depend on the number of threads), divided by the slope
// of the channel where `per_slope` (conv3x3_act's prelu from the output y = a z).
template <typename T, class Row>
void rows_backward(Row row, const T* s, const T* g, T* gi, T* gw, bool per_slope, int64_t N, int64_t C, int64_t S,
                   const Params<T>& p) {
    const int64_t rows = N * C;
    std::vector<double> row_sum(gw ? static_cast<std::size_t>(rows) : 0);
    double* row_sum_p = row_sum.data();
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) {
        const double acc = row(s + r * S, g + r * S, gi + r * S, S, p.channel(r % C));
        if (row_sum_p) row_sum_p[r] = acc;
    }
    if (!gw) return;
    for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) acc += row_sum_p[n * C + c];
        gw[c] = static_cast<T>(per_slope ? acc / static_cast<double>(p.channel(c).slope) : acc);
    }
}

}  // namespace act
}  // namespace pycnn
