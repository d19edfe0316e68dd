// maxout -- forward and backward, float32 and float64.  The NumPy reference in
// pycnn/ops/activations.py is the spec.
//
//   x (N, C*k, S) -> y (N, C, S), y[n, c, s] = max_j x[n, c*k + j, s]; the first maximum wins
//   ties and the first NaN wins (np.argmax); the winner j (uint8, so k <= 256) is stored for
//   the backward pass, which routes grad_y to it and writes 0 elsewhere.
// OpenMP over the rows (n, c) of the (N, C, k, S) view with a static schedule, the inner loop
// over s vectorised; outputs allocated by the caller, the GIL released around the loops.
#include "common.hpp"

#include <cstdint>
#include <string>

namespace {

using std::int64_t;
using std::uint8_t;
using pycnn::kParallelMinElements;

constexpr int64_t kMaxPieces = 256;  // the winner is a uint8

// x is (R, k, S) with R = N*C rows; y and winner are (R, S).
template <typename T>
void maxout_forward_kernel(const T* x, T* y, uint8_t* winner, int64_t R, int64_t k, int64_t S) {
#pragma omp parallel for schedule(static) if (R * k * S >= kParallelMinElements)
    for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + r * k * S;
        T* yr = y + r * S;
        uint8_t* wr = winner + r * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
            yr[s] = xr[s];
            wr[s] = 0;
        }
        for (int64_t j = 1; j < k; ++j) {
            const T* xj = xr + j * S;
            const auto idx = static_cast<uint8_t>(j);
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) {
                const T v = xj[s], best = yr[s];
                // a larger value wins, a NaN wins over a number; ties and later NaNs lose
                const bool take = v > best || (v != v && best == best);
                yr[s] = take ? v : best;
                wr[s] = take ? idx : wr[s];
            }
        }
    }
}

// grad_x[r, j, s] = grad_y[r, s] where winner[r, s] == j else 0
template <typename T>
void maxout_backward_kernel(const T* gy, const uint8_t* winner, T* gx, int64_t R, int64_t k, int64_t S) {
#pragma omp parallel for schedule(static) if (R * k * S >= kParallelMinElements)
    for (int64_t r = 0; r < R; ++r) {
        const T* gr = gy + r * S;
        const uint8_t* wr = winner + r * S;
        for (int64_t j = 0; j < k; ++j) {
            T* gxj = gx + (r * k + j) * S;
            const auto idx = static_cast<uint8_t>(j);
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) gxj[s] = wr[s] == idx ? gr[s] : T(0);
        }
    }
}

// --------------------------------------------------------------------------- bindings
using pycnn::as_array;
using pycnn::as_array_like;
using pycnn::as_float_array;
using pycnn::check_same_shape;
using pycnn::data_of;
using pycnn::dispatch_float;
using pycnn::mutable_data_of;
using pycnn::shape_str;

// maxout: x (N, C*k, ...) and y (N, C, ...).  Returns (R = N*C, S).
struct MaxoutDims { int64_t R, S; };

MaxoutDims maxout_dims(const char* fn, const char* x_name, const py::array& x, const char* y_name, const py::array& y,
                       int64_t pieces) {
    if (pieces < 1 || pieces > kMaxPieces) {
        throw py::value_error(std::string(fn) + ": pieces must be in [1, 256] (the winner is a uint8), got " +
                              std::to_string(pieces));
    }
    if (x.ndim() < 2) {
        throw py::value_error(std::string(fn) + ": " + x_name +
                              " must have at least 2 dimensions (N, C*k, ...), got shape " + shape_str(x));
    }
    if (x.shape(1) % pieces != 0) {
        throw py::value_error(std::string(fn) + ": " + x_name + " must have a channel count divisible by pieces=" +
                              std::to_string(pieces) + ", got shape " + shape_str(x));
    }
    auto expected = pycnn::shape_of(x);
    expected[1] /= pieces;
    if (pycnn::shape_of(y) != expected) {
        py::array want(x.dtype(), expected);  // only for its shape string
        throw py::value_error(std::string(fn) + ": " + y_name + " must have shape " + shape_str(want) + " (" + x_name +
                              " with C*k / pieces channels), got " + shape_str(y));
    }
    int64_t S = 1;
    for (py::ssize_t d = 2; d < x.ndim(); ++d) S *= x.shape(d);
    return {static_cast<int64_t>(x.shape(0) * expected[1]), S};
}

py::array as_winner(const char* fn, const py::object& obj, const py::array& y, const char* y_name, bool writeable) {
    py::array w = as_array(fn, "winner", obj, writeable);
    if (!w.dtype().equal(py::dtype::of<uint8_t>())) {
        throw py::type_error(std::string(fn) + ": winner must be uint8, got " + pycnn::dtype_name(w));
    }
    check_same_shape(fn, "winner", w, y_name, y);
    return w;
}

void define(py::module_& m) {
    m.def(
        "maxout_forward",
        [](const py::object& x_obj, const py::object& y_obj, const py::object& w_obj, int64_t pieces) {
            const char* fn = "maxout_forward";
            py::array x = as_float_array(fn, "x", x_obj);
            py::array y = as_array_like(fn, "y", y_obj, "x", x, true);
            const MaxoutDims d = maxout_dims(fn, "x", x, "y", y, pieces);
            py::array w = as_winner(fn, w_obj, y, "y", true);
            dispatch_float(x, [&](auto zero) {
                using T = decltype(zero);
                const T* xp = data_of<T>(x);
                T* yp = mutable_data_of<T>(y);
                auto* wp = static_cast<uint8_t*>(w.mutable_data());
                py::gil_scoped_release nogil;
                maxout_forward_kernel<T>(xp, yp, wp, d.R, pieces, d.S);
            });
        },
        py::arg("x"), py::arg("y"), py::arg("winner"), py::arg("pieces"),
        "x (N, C*k, ...) -> y (N, C, ...) = max over each group of k = pieces consecutive channels, and winner "
        "(uint8, shaped like y): the index of the first maximum in its group (a NaN wins).");
    m.def(
        "maxout_backward",
        [](const py::object& gy_obj, const py::object& w_obj, const py::object& gx_obj, int64_t pieces) {
            const char* fn = "maxout_backward";
            py::array gy = as_float_array(fn, "grad_y", gy_obj);
            py::array gx = as_array_like(fn, "grad_x", gx_obj, "grad_y", gy, true);
            const MaxoutDims d = maxout_dims(fn, "grad_x", gx, "grad_y", gy, pieces);
            py::array w = as_winner(fn, w_obj, gy, "grad_y", false);
            dispatch_float(gy, [&](auto zero) {
                using T = decltype(zero);
                const T* gyp = data_of<T>(gy);
                T* gxp = mutable_data_of<T>(gx);
                const auto* wp = static_cast<const uint8_t*>(w.data());
                py::gil_scoped_release nogil;
                maxout_backward_kernel<T>(gyp, wp, gxp, d.R, pieces, d.S);
            });
        },
        py::arg("grad_y"), py::arg("winner"), py::arg("grad_x"), py::arg("pieces"),
        "grad_x (N, C*k, ...): grad_y routed to the winner of each group, 0 elsewhere (overwritten).");
}

const pycnn::Bindings bindings(define);

}  // namespace
