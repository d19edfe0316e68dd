// The activation idiom of the C++ backend: one activation = one functor, written once, from
// which this header makes
//   (a) the elementwise kernels  <name>_forward / <name>_backward  (flat maps, or rows of the
//       (N, C, S) view for a per-channel activation),
//   (b) their Python bindings (def_map: the checks of common.hpp, float32 and float64, GIL released),
//   (c) the fused epilogue of conv3x3_act (conv3x3.hpp: Epilogue), registered by name
//       (ConvRegistrar), so that the conv and the elementwise kernel run the same per-element code.
// An activation file (csrc/act_*.cpp) holds functors, a registrar per conv activation and one
// pycnn::Bindings object; CMakeLists.txt globs csrc/*.cpp and compiles csrc/act_*.cpp without
// fused multiply-adds (-ffp-contract=off, as the NumPy references round), so adding an
// activation is adding one file.
//
// A functor (derive from Functor, which gives the defaults):
//   static constexpr const char* kName;              the name of the bindings and of the conv activation
//   template <class T> static T forward(T z, const Params<T>& p);         y = act(z)
//   template <class T> static T backward(T s, T g, const Params<T>& p);   g * act'(z), s the saved array
//   static constexpr Scalar kScalar; kScalarDefault;  the one scalar parameter of the bindings, if any
//   template <class T> static bool grad_from_output(const Params<T>& p);
//       whether `backward` gives the same result from s = y = act(z) as from s = z (true for the
//       rectifiers whose output has the sign of z; conv3x3_act then keeps y alone: saves_pre)
//   static constexpr bool kPerChannel;  prelu: p.slope is the slope of the row's channel, and
//       template <class T> static double weight_grad(T s, T g);  its term of that slope's gradient
// forward and backward are inline and branch-free (selects), so the loops that call them vectorise.
#pragma once

#include "common.hpp"

#include <cstdint>
#include <string>
#include <type_traits>
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
    static bool grad_from_output(const Params<T>&) { return false; }
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
    std::vector<double> row_sum(gw ? static_cast<size_t>(rows) : 0);
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

// ------------------------------------------------------------------------ bindings
// <name>_forward(x, out[, scalar]) and <name>_backward(x, grad_out, grad_in[, scalar]) of a
// flat activation; the scalar argument (A::kScalar) is named "slope" or "alpha".
template <class A>
void def_map(py::module_& m, const char* forward_doc, const char* backward_doc) {
    const std::string fwd = std::string(A::kName) + "_forward", bwd = std::string(A::kName) + "_backward";
    auto forward = [fwd](const py::object& x, const py::object& out, double v) {
        map_call(fwd.c_str(), "x", x, "out", out, [v](auto xp, auto op, int64_t n) {
            using T = element_t<decltype(xp)>;
            map_forward<A, T>(xp, op, n, scalar_params<A, T>(v));
        });
    };
    auto backward = [bwd](const py::object& x, const py::object& g, const py::object& gi, double v) {
        map_backward_call(bwd.c_str(), x, g, gi, [v](auto xp, auto gp, auto gip, int64_t n) {
            using T = element_t<decltype(xp)>;
            map_backward<A, T>(xp, gp, gip, n, scalar_params<A, T>(v));
        });
    };
    if constexpr (A::kScalar == Scalar::None) {
        m.def(
            fwd.c_str(), [forward](const py::object& x, const py::object& out) { forward(x, out, 0.0); },
            py::arg("x"), py::arg("out"), forward_doc);
        m.def(
            bwd.c_str(),
            [backward](const py::object& x, const py::object& g, const py::object& gi) { backward(x, g, gi, 0.0); },
            py::arg("x"), py::arg("grad_out"), py::arg("grad_in"), backward_doc);
    } else {
        const char* scalar = A::kScalar == Scalar::Slope ? "slope" : "alpha";
        m.def(fwd.c_str(), forward, py::arg("x"), py::arg("out"), py::arg(scalar) = A::kScalarDefault, forward_doc);
        m.def(bwd.c_str(), backward, py::arg("x"), py::arg("grad_out"), py::arg("grad_in"),
              py::arg(scalar) = A::kScalarDefault, backward_doc);
    }
}

// ---------------------------------------------------------- conv3x3_act activations
// The activations conv3x3_act takes by name: the row functions of each dtype (a function
// pointer per stretch of outputs costs nothing next to the convolution) and the
// pre-activation rule.
struct ConvActivation {
    std::string name;
    bool per_channel;  // takes prelu_weight (K,)
    RowForward<float> forward_f32;
    RowForward<double> forward_f64;
    RowBackward<float> backward_f32;
    RowBackward<double> backward_f64;
    bool (*grad_from_output_f32)(const Params<float>&);
    bool (*grad_from_output_f64)(const Params<double>&);

    template <typename T>
    RowForward<T> forward() const {
        if constexpr (std::is_same_v<T, float>) return forward_f32; else return forward_f64;
    }
    template <typename T>
    RowBackward<T> backward() const {
        if constexpr (std::is_same_v<T, float>) return backward_f32; else return backward_f64;
    }
    template <typename T>
    bool grad_from_output(const Params<T>& p) const {
        if constexpr (std::is_same_v<T, float>) return grad_from_output_f32(p); else return grad_from_output_f64(p);
    }
};

void add_conv_activation(ConvActivation a);  // activation.cpp

// `const ConvRegistrar<Relu> relu_conv;` in an activation file makes "relu" a conv3x3_act activation.
template <class A>
struct ConvRegistrar {
    ConvRegistrar() {
        add_conv_activation({A::kName, A::kPerChannel, &row_forward<A, float>, &row_forward<A, double>,
                             &row_backward<A, float>, &row_backward<A, double>, &A::template grad_from_output<float>,
                             &A::template grad_from_output<double>});
    }
};

// The activation called `name`; ValueError "<fn>: activation must be one of 'elu', ... got '<name>'".
const ConvActivation& conv_activation(const char* fn, const std::string& name);

// Whether conv3x3_act's backward pass needs the pre-activation z (saved_is_pre=True) rather than
// the output y, for these parameters (prelu_weight: None, or the (K,) slopes of 'prelu', which
// needs them and which alone takes them).  The one place that decides it for the CPU: the
// binding conv3x3_act_saves_pre and check_saved.
bool saves_pre(const char* fn, const std::string& activation, double slope, double alpha,
               const py::object& prelu_weight);

// The check of the fused backward passes (conv3x3_act, batchnorm_act): ValueError where the
// output y was saved (saved_is_pre=False) but saves_pre says the gradient needs z.
void check_saved(const char* fn, const std::string& activation, bool saved_is_pre, double slope, double alpha,
                 const py::object& prelu_weight);

}  // namespace act
}  // namespace pycnn
