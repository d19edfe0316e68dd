// Batch normalisation over x (N, C, S): S = H*W for 4-D inputs, 1 for 2-D inputs.
//
// The statistics are the corrected sums of d = x - c around a centre c close to the mean
// (Chan, Golub & LeVeque 1983), in double:
//   mean = c + sum(d) / M,   M2 = sum(d^2) - sum(d)^2 / M,   var = M2 / M
// sum(d) repairs the distance from c to the mean to first order, and nothing subtracts two
// large numbers (E[x^2] - E[x]^2 loses everything once |mean| >> std).  c is a first pass's
// mean (two-pass), or for float32 rows a value of the row (row_moments says why that is
// enough).  This is done per (n, c) row while it is in L1, and the rows are merged by Chan's
// formula (stats_kernel).  Every sum has a fixed order that depends on the shape alone: the
// results are the same on any number of OpenMP threads.
#include "activation.hpp"
#include "common.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using pycnn::kParallelMinElements;
namespace act = pycnn::act;

struct BatchNormDims {
    int64_t N, C, S;
};

BatchNormDims batchnorm_dims(const char* fn, const py::array& x) {
    if (x.ndim() != 2 && x.ndim() != 4) {
        throw py::value_error(std::string(fn) + ": x must have 2 or 4 dimensions, got " + pycnn::shape_str(x));
    }
    BatchNormDims d{x.shape(0), x.shape(1), 1};
    if (x.ndim() == 4) d.S = x.shape(2) * x.shape(3);
    return d;
}

void check_channels(const char* fn, const char* name, const py::array& a, int64_t C) {
    if (a.ndim() != 1 || a.shape(0) != C) {
        throw py::value_error(std::string(fn) + ": " + name + " must have shape (" + std::to_string(C) +
                              ",), got " + pycnn::shape_str(a));
    }
}

// Two per-element terms, summed per channel in double.
struct Terms {
    double a, b;
};

constexpr int64_t kColumnBlock = 64;  // channels per thread in the S = 1 layout

// out[c] = sum over n, s of term(u[i], v[i], shift[c]), i = (n * C + c) * S + s the flat index
// of the (N, C, S) arrays u and v; shift (C,) is a per-channel constant of the term (passed
// by value so that it stays in a register).
// The order of the additions depends on the shape alone, never on the thread count:
//   S > 1:  each (n, c) row of S values is summed by one thread (SIMD lanes, then the
//           lanes in a fixed order), then the rows of a channel are added in order of n;
//   S = 1:  (N, C) input: each channel is summed in order of n by one thread, the loop over
//           a block of channels vectorised (one lane per channel).
// `prologue(r)` (S > 1 only) runs on the thread that sums row r, just before: batchnorm_act's
// backward writes the row of u there, so that it is summed while it is in L1.
struct NoPrologue {
    void operator()(int64_t) const {}
};

template <typename T, typename Term, typename Prologue = NoPrologue>
void channel_sums(const T* u, const T* v, const double* shift, int64_t N, int64_t C, int64_t S, Term term,
                  std::vector<Terms>& out, Prologue prologue = Prologue()) {
    out.assign(static_cast<size_t>(C), Terms{0.0, 0.0});
    Terms* outp = out.data();
    const bool parallel = N * C * S >= kParallelMinElements;
    if (S > 1) {
        const int64_t rows = N * C;
        std::vector<Terms> per_row(static_cast<size_t>(rows));
        Terms* rowp = per_row.data();
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t r = 0; r < rows; ++r) {
            prologue(r);
            const double sc = shift[r % C];
            const T* ur = u + r * S;
            const T* vr = v + r * S;
            double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
            for (int64_t s = 0; s < S; ++s) {
                const Terms t = term(ur[s], vr[s], sc);
                a += t.a;
                b += t.b;
            }
            rowp[r] = Terms{a, b};
        }
        for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < C; ++c) {
                outp[c].a += rowp[n * C + c].a;
                outp[c].b += rowp[n * C + c].b;
            }
        return;
    }
    const int64_t blocks = (C + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t c0 = blk * kColumnBlock, width = std::min(kColumnBlock, C - c0);
        double a[kColumnBlock] = {}, b[kColumnBlock] = {};
        for (int64_t n = 0; n < N; ++n) {
            const T* un = u + n * C + c0;
            const T* vn = v + n * C + c0;
            const double* sn = shift + c0;
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) {
                const Terms t = term(un[j], vn[j], sn[j]);
                a[j] += t.a;
                b[j] += t.b;
            }
        }
        for (int64_t j = 0; j < width; ++j) outp[c0 + j] = Terms{a[j], b[j]};
    }
}

// Over the S values of one row: their mean minus `shift`, and M2 = sum (x - mean)^2, from
// the corrected sums of d = x - c around a centre c of the row:
//   mean = c + sum(d) / S,   M2 = sum(d^2) - sum(d)^2 / S,
// which lose about 2^-53 (c - mean)^2 / var of M2's relative accuracy, and no more:
//   float rows up to kOnePassRow values: c = the row's first value, one pass.  A value of a
//           row is never more than sqrt(S - 1) standard deviations from its mean, so
//           sum(d^2) <= S * M2: with the rounding of the sums, at worst S^2 * 2^-53 relative
//           (2e-9 for S = 4096; typically 2^-53), far below float32 precision;
//   double rows, longer float rows: c = sum(x) / S, a first pass (the second reads the row
//           from L1 or L2); c's own rounding then costs ~2^-53 * S * (2^-53 mean / std)^2.
// The mean is returned relative to shift, (c - shift) + sum(d) / S, which keeps the digits
// that matter when the rows are merged.
constexpr int64_t kOnePassRow = 4096;

template <typename T>
inline void row_moments(const T* xr, int64_t S, double shift, double& mean, double& m2) {
    double c = static_cast<double>(xr[0]);
    if (std::is_same_v<T, double> || S > kOnePassRow) {
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < S; ++i) s += xr[i];
        c = s / static_cast<double>(S);
    }
    if (!std::isfinite(c)) c = 0.0;  // an inf or NaN in the row: x - c must not be inf - inf
    double sd = 0.0, sdd = 0.0;
#pragma omp simd reduction(+ : sd, sdd)
    for (int64_t i = 0; i < S; ++i) {
        const double d = static_cast<double>(xr[i]) - c;
        sd += d;
        sdd += d * d;
    }
    mean = (c - shift) + sd / static_cast<double>(S);
    m2 = sdd - sd * (sd / static_cast<double>(S));
}

// mean[c] and the biased var[c] of x over N and S.
//   S > 1: the moments of each (n, c) row (row_moments, x read from memory once), merged over
//          the rows of a channel in order of n by Chan's formula.  The row means are taken
//          relative to shift[c] = x[0, c, 0], a value of the channel, so they are small next
//          to |mean| (at most sqrt(N*S) standard deviations) and their differences in the
//          merge keep their digits (without the shift, data around 1e8 +- 1 lost 1e-9);
//   S = 1: two passes over the (N, C) array (channel_sums: vectorised across channels).
template <typename T>
void stats_kernel(const T* x, T* mean, T* var, int64_t N, int64_t C, int64_t S) {
    const double count = static_cast<double>(N * S);
    if (S > 1) {
        const int64_t rows = N * C;
        std::vector<double> shift(static_cast<size_t>(C)), row_mean(static_cast<size_t>(rows)),
            row_m2(static_cast<size_t>(rows));
        for (int64_t c = 0; c < C; ++c) {  // x[0, c, 0] (0 if it is not finite: inf - inf would be NaN)
            const double first = static_cast<double>(x[c * S]);
            shift[c] = std::isfinite(first) ? first : 0.0;
        }
        double *rmp = row_mean.data(), *rm2p = row_m2.data();
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
        for (int64_t r = 0; r < rows; ++r) row_moments(x + r * S, S, shift[r % C], rmp[r], rm2p[r]);
        // Chan's merge of row k into rows 0..k-1 (k * S values, every row has S):
        //   delta = mean_k - mean,  mean += delta / (k + 1),  M2 += M2_k + delta^2 * k S / (k + 1)
        std::vector<double> m(rmp, rmp + C), m2(rm2p, rm2p + C);  // (C,): row 0, then merged
        double *mp = m.data(), *m2p = m2.data();
        for (int64_t k = 1; k < N; ++k) {
            const double w = 1.0 / static_cast<double>(k + 1), v = static_cast<double>(S) * static_cast<double>(k) * w;
            const double *rk = rmp + k * C, *r2k = rm2p + k * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                const double delta = rk[c] - mp[c];
                mp[c] += delta * w;
                m2p[c] += r2k[c] + delta * delta * v;
            }
        }
        for (int64_t c = 0; c < C; ++c) {
            mean[c] = static_cast<T>(shift[c] + mp[c]);
            var[c] = static_cast<T>(std::max(m2p[c] / count, 0.0));
        }
        return;
    }
    std::vector<Terms> sums;
    std::vector<double> m0(static_cast<size_t>(C), 0.0);
    channel_sums(x, x, m0.data(), N, C, S, [](T xi, T, double) { return Terms{static_cast<double>(xi), 0.0}; }, sums);
    for (int64_t c = 0; c < C; ++c) m0[c] = sums[c].a / count;
    channel_sums(x, x, m0.data(), N, C, S, [](T xi, T, double m) {
        const double d = static_cast<double>(xi) - m;
        return Terms{d, d * d};
    }, sums);
    for (int64_t c = 0; c < C; ++c) {  // the corrected two-pass formula (top of the file)
        const double sd = sums[c].a, sdd = sums[c].b;
        mean[c] = static_cast<T>(m0[c] + sd / count);
        var[c] = static_cast<T>(std::max((sdd - sd * (sd / count)) / count, 0.0));
    }
}

// z = (x - mean[c]) * scale[c] + shift[c];  y = z, or y = act(z) with an activation (batchnorm_act:
// applied to each row while it is in L1, z kept in `pre` where that is not null).
template <typename T>
void apply_kernel(const T* x, const T* mean, const T* scale, const T* shift, T* y, int64_t N, int64_t C,
                  int64_t S, act::RowForward<T> activation = nullptr, const act::Params<T>& params = {},
                  T* pre = nullptr) {
    const int64_t rows = N * C;
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r % C;
        const T m = mean[c], a = scale[c], b = shift[c];
        const T* xr = x + r * S;
        T* yr = y + r * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) yr[i] = (xr[i] - m) * a + b;
        if (activation) {
            if (pre) std::memcpy(pre + r * S, yr, sizeof(T) * static_cast<size_t>(S));
            activation(yr, yr, S, params.channel(c));
        }
    }
}

// With x_hat = (x - mean) * invstd:
//   grad_beta = sum g,  grad_gamma = sum g * x_hat
//   training:   grad_x = gamma * invstd * (g - grad_beta / M - x_hat * grad_gamma / M)
//   evaluation: grad_x = gamma * invstd * g
// The gradient sums of g (sum g, sum g * (x - mean)) per channel; prologue(r) as in channel_sums.
template <typename T, typename Prologue = NoPrologue>
std::vector<Terms> backward_sums(const T* x, const T* mean, const T* g, int64_t N, int64_t C, int64_t S,
                                 Prologue prologue = Prologue()) {
    std::vector<double> shift(mean, mean + C);
    std::vector<Terms> sums;
    channel_sums(g, x, shift.data(), N, C, S, [](T gi, T xi, double m) {
        const double gv = static_cast<double>(gi);
        return Terms{gv, gv * (static_cast<double>(xi) - m)};
    }, sums, prologue);
    return sums;
}

template <typename T>
void backward_from_sums(const T* x, const T* mean, const T* invstd, const T* gamma, const T* g, T* gx, T* ggamma,
                        T* gbeta, int64_t N, int64_t C, int64_t S, bool training, const std::vector<Terms>& sums) {
    const double count = static_cast<double>(N * S);
    std::vector<T> k0(C), k1(C), k2(C);  // grad_x = k0 * g + k1 * (x - mean) + k2
    for (int64_t c = 0; c < C; ++c) {
        const double is = static_cast<double>(invstd[c]);
        const double sum_g = sums[c].a;
        const double sum_gxhat = sums[c].b * is;
        gbeta[c] = static_cast<T>(sum_g);
        ggamma[c] = static_cast<T>(sum_gxhat);
        const double scale = static_cast<double>(gamma[c]) * is;
        k0[c] = static_cast<T>(scale);
        k1[c] = training ? static_cast<T>(-scale * sum_gxhat * is / count) : T(0);
        k2[c] = training ? static_cast<T>(-scale * sum_g / count) : T(0);
    }
    const int64_t rows = N * C;
    const T* k0p = k0.data();
    const T* k1p = k1.data();
    const T* k2p = k2.data();
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r % C;
        const T a = k0p[c], b = k1p[c], d = k2p[c], m = mean[c];
        const T* xr = x + r * S;
        const T* gr = g + r * S;
        T* gxr = gx + r * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) gxr[i] = a * gr[i] + b * (xr[i] - m) + d;  // gr may be gxr
    }
}

template <typename T>
void backward_kernel(const T* x, const T* mean, const T* invstd, const T* gamma, const T* g, T* gx, T* ggamma,
                     T* gbeta, int64_t N, int64_t C, int64_t S, bool training) {
    backward_from_sums(x, mean, invstd, gamma, g, gx, ggamma, gbeta, N, C, S, training,
                       backward_sums(x, mean, g, N, C, S));
}

// batchnorm_act's backward: gz = g * act'(saved) (saved = y, or the pre-activation z where
// saved_is_pre) goes into gx row by row, each row summed while in L1 (S > 1; for 2-D inputs a
// pass of its own), then gx = the batch norm gradient of gz, in place.  gprelu (prelu only, may
// be null): per-row double sums of the slope's gradient terms, added in order of n.
template <typename T>
void backward_act_kernel(const T* x, const T* mean, const T* invstd, const T* gamma, const T* saved,
                         bool saved_is_pre, const T* g, T* gx, T* ggamma, T* gbeta, T* gprelu, int64_t N, int64_t C,
                         int64_t S, bool training, act::RowBackward<T> activation, const act::Params<T>& params) {
    const int64_t rows = N * C;
    std::vector<double> row_sum(gprelu ? static_cast<size_t>(rows) : 0);
    double* row_sum_p = row_sum.data();
    auto activation_row = [&](int64_t r) {
        const double acc = activation(saved + r * S, g + r * S, gx + r * S, S, params.channel(r % C));
        if (row_sum_p) row_sum_p[r] = acc;
    };
    std::vector<Terms> sums;
    if (S > 1) {
        sums = backward_sums(x, mean, static_cast<const T*>(gx), N, C, S, activation_row);
    } else {
#pragma omp parallel for schedule(static) if (rows >= kParallelMinElements)
        for (int64_t r = 0; r < rows; ++r) activation_row(r);
        sums = backward_sums(x, mean, static_cast<const T*>(gx), N, C, S);
    }
    backward_from_sums(x, mean, invstd, gamma, static_cast<const T*>(gx), gx, ggamma, gbeta, N, C, S, training, sums);
    if (!gprelu) return;
    for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) acc += row_sum_p[n * C + c];
        gprelu[c] = static_cast<T>(saved_is_pre ? acc : acc / static_cast<double>(params.channel(c).slope));
    }
}

using pycnn::data_of;
using pycnn::mutable_data_of;

// prelu_weight of batchnorm_act: (C,) like x for a per-channel activation, None otherwise (an
// empty array is returned for None).
py::array prelu_weight_arg(const char* fn, const act::ConvActivation& a, const py::object& obj, const py::array& x,
                           int64_t C) {
    if (obj.is_none() == a.per_channel) {
        throw py::value_error(std::string(fn) + (a.per_channel ? ": activation 'prelu' needs prelu_weight of shape (C,)"
                                                               : ": prelu_weight must be None unless activation is 'prelu'"));
    }
    if (obj.is_none()) return py::array();  // not read: the caller tests obj
    py::array w = pycnn::as_array_like(fn, "prelu_weight", obj, "x", x);
    check_channels(fn, "prelu_weight", w, C);
    return w;
}

// The checked arrays of batchnorm_apply / batchnorm_act_forward.
struct ApplyArgs {
    py::array x, mean, scale, shift, y;
    BatchNormDims d;
    ApplyArgs(const char* fn, const py::object& x_obj, const py::object& mean_obj, const py::object& scale_obj,
              const py::object& shift_obj, const py::object& y_obj)
        : x(pycnn::as_float_array(fn, "x", x_obj)),
          mean(pycnn::as_array_like(fn, "mean", mean_obj, "x", x)),
          scale(pycnn::as_array_like(fn, "scale", scale_obj, "x", x)),
          shift(pycnn::as_array_like(fn, "shift", shift_obj, "x", x)),
          y(pycnn::as_array_like(fn, "y", y_obj, "x", x, true)),
          d(batchnorm_dims(fn, x)) {
        pycnn::check_same_shape(fn, "y", y, "x", x);
        check_channels(fn, "mean", mean, d.C);
        check_channels(fn, "scale", scale, d.C);
        check_channels(fn, "shift", shift, d.C);
    }
};

// The checked arrays of batchnorm_backward / batchnorm_act_backward.
struct BackwardArgs {
    py::array x, mean, invstd, gamma, g, gx, ggamma, gbeta;
    BatchNormDims d;
    BackwardArgs(const char* fn, const py::object& x_obj, const py::object& mean_obj, const py::object& invstd_obj,
                 const py::object& gamma_obj, const py::object& g_obj, const py::object& gx_obj,
                 const py::object& ggamma_obj, const py::object& gbeta_obj)
        : x(pycnn::as_float_array(fn, "x", x_obj)),
          mean(pycnn::as_array_like(fn, "mean", mean_obj, "x", x)),
          invstd(pycnn::as_array_like(fn, "invstd", invstd_obj, "x", x)),
          gamma(pycnn::as_array_like(fn, "gamma", gamma_obj, "x", x)),
          g(pycnn::as_array_like(fn, "grad_out", g_obj, "x", x)),
          gx(pycnn::as_array_like(fn, "grad_in", gx_obj, "x", x, true)),
          ggamma(pycnn::as_array_like(fn, "grad_gamma", ggamma_obj, "x", x, true)),
          gbeta(pycnn::as_array_like(fn, "grad_beta", gbeta_obj, "x", x, true)),
          d(batchnorm_dims(fn, x)) {
        pycnn::check_same_shape(fn, "grad_out", g, "x", x);
        pycnn::check_same_shape(fn, "grad_in", gx, "x", x);
        for (auto [name, a] : {std::pair<const char*, py::array*>{"mean", &mean}, {"invstd", &invstd},
                               {"gamma", &gamma}, {"grad_gamma", &ggamma}, {"grad_beta", &gbeta}}) {
            check_channels(fn, name, *a, d.C);
        }
    }
};

void define(py::module_& m) {
    using pycnn::as_array_like;
    using pycnn::as_float_array;
    using pycnn::dispatch_float;

    m.def(
        "batchnorm_stats",
        [](const py::object& x_obj, const py::object& mean_obj, const py::object& var_obj) {
            const char* fn = "batchnorm_stats";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array mean = as_array_like(fn, "mean", mean_obj, "x", x, true);
            py::array var = as_array_like(fn, "var", var_obj, "x", x, true);
            const BatchNormDims d = batchnorm_dims(fn, x);
            if (d.N * d.S < 1) throw py::value_error(std::string(fn) + ": x must not be empty");
            check_channels(fn, "mean", mean, d.C);
            check_channels(fn, "var", var, d.C);
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = data_of<T>(x);
                T* mp = mutable_data_of<T>(mean);
                T* vp = mutable_data_of<T>(var);
                py::gil_scoped_release nogil;
                stats_kernel<T>(xp, mp, vp, d.N, d.C, d.S);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("var"),
        "x (N, C) or (N, C, H, W): writes the per-channel mean and biased variance (C,).");
    m.def(
        "batchnorm_apply",
        [](const py::object& x_obj, const py::object& mean_obj, const py::object& scale_obj,
           const py::object& shift_obj, const py::object& y_obj) {
            ApplyArgs a("batchnorm_apply", x_obj, mean_obj, scale_obj, shift_obj, y_obj);
            dispatch_float(a.x, [&](auto zero) {
                using T = decltype(zero);
                const T *xp = data_of<T>(a.x), *mp = data_of<T>(a.mean), *ap = data_of<T>(a.scale),
                        *bp = data_of<T>(a.shift);
                T* yp = mutable_data_of<T>(a.y);
                py::gil_scoped_release nogil;
                apply_kernel<T>(xp, mp, ap, bp, yp, a.d.N, a.d.C, a.d.S);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("shift"), py::arg("y"),
        "y = (x - mean[c]) * scale[c] + shift[c] over (N, C) or (N, C, H, W).");
    m.def(
        "batchnorm_backward",
        [](const py::object& x_obj, const py::object& mean_obj, const py::object& invstd_obj,
           const py::object& gamma_obj, const py::object& g_obj, const py::object& gx_obj,
           const py::object& ggamma_obj, const py::object& gbeta_obj, bool training) {
            BackwardArgs b("batchnorm_backward", x_obj, mean_obj, invstd_obj, gamma_obj, g_obj, gx_obj,
                                 ggamma_obj, gbeta_obj);
            dispatch_float(b.x, [&](auto zero) {
                using T = decltype(zero);
                const T *xp = data_of<T>(b.x), *mp = data_of<T>(b.mean), *ip = data_of<T>(b.invstd),
                        *gp = data_of<T>(b.gamma), *gop = data_of<T>(b.g);
                T *gxp = mutable_data_of<T>(b.gx), *ggp = mutable_data_of<T>(b.ggamma), *gbp = mutable_data_of<T>(b.gbeta);
                py::gil_scoped_release nogil;
                backward_kernel<T>(xp, mp, ip, gp, gop, gxp, ggp, gbp, b.d.N, b.d.C, b.d.S, training);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("gamma"), py::arg("grad_out"), py::arg("grad_in"),
        py::arg("grad_gamma"), py::arg("grad_beta"), py::arg("training"),
        "Gradients of batch norm; training=True includes the dependence of the batch statistics on x.");

    // ------------------------------------------------ batch norm + activation in one pass
    m.def(
        "batchnorm_act_forward",
        [](const py::object& x_obj, const py::object& mean_obj, const py::object& scale_obj,
           const py::object& shift_obj, const py::object& a_obj, const py::object& y_obj, const py::object& pre_obj,
           const std::string& activation, double slope, double alpha) {
            const char* fn = "batchnorm_act_forward";
            const act::ConvActivation& fns = act::conv_activation(fn, activation);
            ApplyArgs b(fn, x_obj, mean_obj, scale_obj, shift_obj, y_obj);
            const py::array a = prelu_weight_arg(fn, fns, a_obj, b.x, b.d.C);
            const bool has_prelu = !a_obj.is_none();
            py::array pre;
            if (!pre_obj.is_none()) {
                pre = as_array_like(fn, "pre", pre_obj, "x", b.x, true);
                pycnn::check_same_shape(fn, "pre", pre, "x", b.x);
            }
            dispatch_float(b.x, [&](auto zero) {
                using T = decltype(zero);
                const T *xp = data_of<T>(b.x), *mp = data_of<T>(b.mean), *ap = data_of<T>(b.scale),
                        *bp = data_of<T>(b.shift);
                const act::Params<T> params =
                    act::make_params<T>(slope, alpha, has_prelu ? data_of<T>(a) : nullptr, has_prelu ? b.d.C : 0);
                T* yp = mutable_data_of<T>(b.y);
                T* prep = pre_obj.is_none() ? nullptr : mutable_data_of<T>(pre);
                py::gil_scoped_release nogil;
                apply_kernel<T>(xp, mp, ap, bp, yp, b.d.N, b.d.C, b.d.S, fns.forward<T>(), params, prep);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("shift"), py::arg("prelu_weight"), py::arg("y"),
        py::arg("pre"), py::arg("activation"), py::arg("slope") = 0.01, py::arg("alpha") = 1.0,
        "y = act((x - mean[c]) * scale[c] + shift[c]) in one pass over (N, C) or (N, C, H, W): the activations of "
        "conv3x3_act (prelu_weight (C,) for 'prelu', None otherwise).  pre: None or an array like x that receives "
        "the pre-activation, for a backward pass that needs it (the caller decides: pycnn/ops/conv.py, "
        "grad_from_output).");
    m.def(
        "batchnorm_act_backward",
        [](const py::object& x_obj, const py::object& mean_obj, const py::object& invstd_obj,
           const py::object& gamma_obj, const py::object& a_obj, const py::object& s_obj, bool saved_is_pre,
           const py::object& g_obj, const py::object& gx_obj, const py::object& ggamma_obj,
           const py::object& gbeta_obj, const py::object& ga_obj, bool training, const std::string& activation,
           double slope, double alpha) {
            const char* fn = "batchnorm_act_backward";
            const act::ConvActivation& fns = act::conv_activation(fn, activation);
            BackwardArgs b(fn, x_obj, mean_obj, invstd_obj, gamma_obj, g_obj, gx_obj, ggamma_obj, gbeta_obj);
            const py::array saved = as_array_like(fn, "saved", s_obj, "x", b.x);
            pycnn::check_same_shape(fn, "saved", saved, "x", b.x);
            const py::array a = prelu_weight_arg(fn, fns, a_obj, b.x, b.d.C);
            const bool has_prelu = !a_obj.is_none();
            py::array ga;
            if (!ga_obj.is_none()) {
                if (!has_prelu) throw py::value_error(std::string(fn) + ": grad_prelu_weight must be None unless activation is 'prelu'");
                ga = as_array_like(fn, "grad_prelu_weight", ga_obj, "x", b.x, true);
                check_channels(fn, "grad_prelu_weight", ga, b.d.C);
            }
            dispatch_float(b.x, [&](auto zero) {
                using T = decltype(zero);
                const T *xp = data_of<T>(b.x), *mp = data_of<T>(b.mean), *ip = data_of<T>(b.invstd),
                        *gp = data_of<T>(b.gamma), *sp = data_of<T>(saved), *gop = data_of<T>(b.g);
                const act::Params<T> params =
                    act::make_params<T>(slope, alpha, has_prelu ? data_of<T>(a) : nullptr, has_prelu ? b.d.C : 0);
                T *gxp = mutable_data_of<T>(b.gx), *ggp = mutable_data_of<T>(b.ggamma), *gbp = mutable_data_of<T>(b.gbeta);
                T* gap = ga_obj.is_none() ? nullptr : mutable_data_of<T>(ga);
                py::gil_scoped_release nogil;
                backward_act_kernel<T>(xp, mp, ip, gp, sp, saved_is_pre, gop, gxp, ggp, gbp, gap, b.d.N, b.d.C, b.d.S,
                                       training, fns.backward<T>(), params);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("gamma"), py::arg("prelu_weight"), py::arg("saved"),
        py::arg("saved_is_pre"), py::arg("grad_out"), py::arg("grad_in"), py::arg("grad_gamma"), py::arg("grad_beta"),
        py::arg("grad_prelu_weight"), py::arg("training"), py::arg("activation"), py::arg("slope") = 0.01,
        py::arg("alpha") = 1.0,
        "Gradients of batchnorm_act_forward: grad_out is the gradient of y = act(batch norm of x); saved is y "
        "(saved_is_pre=False, where the caller's rule allows it) or the pre-activation; grad_prelu_weight "
        "(C,) or None (prelu only).  grad_in, grad_gamma, grad_beta are overwritten.");
}

const pycnn::Bindings bindings(define);

}  // namespace
