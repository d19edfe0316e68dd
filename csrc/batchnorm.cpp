// Batch normalisation over x (N, C, S): S = H*W for 4-D inputs, 1 for 2-D inputs.
//
// Statistics are summed per (n, c) row in double, then per channel in the order of n, so
// the result does not depend on the number of threads.  The variance is E[x^2] - E[x]^2 in
// double: for float32 data the cancellation costs nothing unless |mean| / std > ~1e4.
#include "common.hpp"

#include <omp.h>

#include <cmath>
#include <vector>

namespace {

using pycnn::kParallelMinElements;

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

// Per-channel sums of f(row r, s) over the rows n*C + c, reduced in the order of n.
// row_sums(r) fills `width` doubles for row r; the channel totals land in `out` (C x width).
template <typename RowSums>
void channel_sums(int64_t N, int64_t C, int64_t S, int width, RowSums row_sums, std::vector<double>& out) {
    const int64_t rows = N * C;
    std::vector<double> per_row(static_cast<size_t>(rows * width));
    double* per_row_p = per_row.data();
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) row_sums(r, per_row_p + r * width);
    out.assign(static_cast<size_t>(C * width), 0.0);
    for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
            for (int k = 0; k < width; ++k) out[c * width + k] += per_row_p[(n * C + c) * width + k];
}

// mean[c] and the biased var[c] of x over N and S.
template <typename T>
void stats_kernel(const T* x, T* mean, T* var, int64_t N, int64_t C, int64_t S) {
    std::vector<double> sums;
    channel_sums(N, C, S, 2, [&](int64_t r, double* acc) {
        const T* xr = x + r * S;
        double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : s, ss)
        for (int64_t i = 0; i < S; ++i) {
            const double v = static_cast<double>(xr[i]);
            s += v;
            ss += v * v;
        }
        acc[0] = s;
        acc[1] = ss;
    }, sums);
    const double count = static_cast<double>(N * S);
    for (int64_t c = 0; c < C; ++c) {
        const double m = sums[2 * c] / count;
        mean[c] = static_cast<T>(m);
        var[c] = static_cast<T>(std::max(sums[2 * c + 1] / count - m * m, 0.0));
    }
}

// y = (x - mean[c]) * scale[c] + shift[c]
template <typename T>
void apply_kernel(const T* x, const T* mean, const T* scale, const T* shift, T* y, int64_t N, int64_t C,
                  int64_t S) {
    const int64_t rows = N * C;
#pragma omp parallel for schedule(static) if (rows * S >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r % C;
        const T m = mean[c], a = scale[c], b = shift[c];
        const T* xr = x + r * S;
        T* yr = y + r * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) yr[i] = (xr[i] - m) * a + b;
    }
}

// With x_hat = (x - mean) * invstd:
//   grad_beta = sum g,  grad_gamma = sum g * x_hat
//   training:   grad_x = gamma * invstd * (g - grad_beta / M - x_hat * grad_gamma / M)
//   evaluation: grad_x = gamma * invstd * g
template <typename T>
void backward_kernel(const T* x, const T* mean, const T* invstd, const T* gamma, const T* g, T* gx, T* ggamma,
                     T* gbeta, int64_t N, int64_t C, int64_t S, bool training) {
    std::vector<double> sums;
    channel_sums(N, C, S, 2, [&](int64_t r, double* acc) {
        const int64_t c = r % C;
        const double m = static_cast<double>(mean[c]);
        const T* xr = x + r * S;
        const T* gr = g + r * S;
        double sg = 0.0, sgx = 0.0;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t i = 0; i < S; ++i) {
            const double gv = static_cast<double>(gr[i]);
            sg += gv;
            sgx += gv * (static_cast<double>(xr[i]) - m);
        }
        acc[0] = sg;
        acc[1] = sgx;
    }, sums);
    const double count = static_cast<double>(N * S);
    std::vector<T> k0(C), k1(C), k2(C);  // grad_x = k0 * g + k1 * (x - mean) + k2
    for (int64_t c = 0; c < C; ++c) {
        const double is = static_cast<double>(invstd[c]);
        const double sum_g = sums[2 * c];
        const double sum_gxhat = sums[2 * c + 1] * is;
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
        for (int64_t i = 0; i < S; ++i) gxr[i] = a * gr[i] + b * (xr[i] - m) + d;
    }
}

template <typename T>
const T* cptr(const py::array& a) { return static_cast<const T*>(a.data()); }
template <typename T>
T* mptr(py::array& a) { return static_cast<T*>(a.mutable_data()); }

}  // namespace

void register_batchnorm(py::module_& m) {
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
                const T* xp = cptr<T>(x);
                T* mp = mptr<T>(mean);
                T* vp = mptr<T>(var);
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
            const char* fn = "batchnorm_apply";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array mean = as_array_like(fn, "mean", mean_obj, "x", x);
            py::array scale = as_array_like(fn, "scale", scale_obj, "x", x);
            py::array shift = as_array_like(fn, "shift", shift_obj, "x", x);
            py::array y = as_array_like(fn, "y", y_obj, "x", x, true);
            pycnn::check_same_shape(fn, "y", y, "x", x);
            const BatchNormDims d = batchnorm_dims(fn, x);
            check_channels(fn, "mean", mean, d.C);
            check_channels(fn, "scale", scale, d.C);
            check_channels(fn, "shift", shift, d.C);
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T *xp = cptr<T>(x), *mp = cptr<T>(mean), *ap = cptr<T>(scale), *bp = cptr<T>(shift);
                T* yp = mptr<T>(y);
                py::gil_scoped_release nogil;
                apply_kernel<T>(xp, mp, ap, bp, yp, d.N, d.C, d.S);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("shift"), py::arg("y"),
        "y = (x - mean[c]) * scale[c] + shift[c] over (N, C) or (N, C, H, W).");
    m.def(
        "batchnorm_backward",
        [](const py::object& x_obj, const py::object& mean_obj, const py::object& invstd_obj,
           const py::object& gamma_obj, const py::object& g_obj, const py::object& gx_obj,
           const py::object& ggamma_obj, const py::object& gbeta_obj, bool training) {
            const char* fn = "batchnorm_backward";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array mean = as_array_like(fn, "mean", mean_obj, "x", x);
            py::array invstd = as_array_like(fn, "invstd", invstd_obj, "x", x);
            py::array gamma = as_array_like(fn, "gamma", gamma_obj, "x", x);
            py::array g = as_array_like(fn, "grad_out", g_obj, "x", x);
            py::array gx = as_array_like(fn, "grad_in", gx_obj, "x", x, true);
            py::array ggamma = as_array_like(fn, "grad_gamma", ggamma_obj, "x", x, true);
            py::array gbeta = as_array_like(fn, "grad_beta", gbeta_obj, "x", x, true);
            pycnn::check_same_shape(fn, "grad_out", g, "x", x);
            pycnn::check_same_shape(fn, "grad_in", gx, "x", x);
            const BatchNormDims d = batchnorm_dims(fn, x);
            for (auto [name, a] : {std::pair<const char*, py::array*>{"mean", &mean}, {"invstd", &invstd},
                                   {"gamma", &gamma}, {"grad_gamma", &ggamma}, {"grad_beta", &gbeta}}) {
                check_channels(fn, name, *a, d.C);
            }
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T *xp = cptr<T>(x), *mp = cptr<T>(mean), *ip = cptr<T>(invstd), *gp = cptr<T>(gamma),
                        *gop = cptr<T>(g);
                T *gxp = mptr<T>(gx), *ggp = mptr<T>(ggamma), *gbp = mptr<T>(gbeta);
                py::gil_scoped_release nogil;
                backward_kernel<T>(xp, mp, ip, gp, gop, gxp, ggp, gbp, d.N, d.C, d.S, training);
            });
        },
        py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("gamma"), py::arg("grad_out"), py::arg("grad_in"),
        py::arg("grad_gamma"), py::arg("grad_beta"), py::arg("training"),
        "Gradients of batch norm; training=True includes the dependence of the batch statistics on x.");
}
