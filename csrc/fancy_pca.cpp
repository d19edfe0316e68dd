// Fancy PCA colour augmentation (Krizhevsky et al. 2012, AlexNet) on a batch, and the streaming
// RGB moments that fit it.  The NumPy reference is pycnn/ops/fancy_pca.py; pycnn/data/augment.py
// (FancyPCA.fit) uses rgb_moments.
//
//   images (N, 3, H, W) uint8, float32 or float64; out (N, 3, H, W) float32 (uint8 and float32
//   input: uint8 stays on its 0..255 scale) or float64:
//     out[n, c] = images[n, c] + delta[n, c],
//     delta[n, c] = scale * sum_i eigvecs[c, i] * (alphas[n, i] * eigvals[i])     (in double,
//   then rounded once to the output dtype, as the reference).  OpenMP over the N*3 planes,
//   the inner loop over the H*W pixels of a plane vectorised (uint8 -> float conversion).
//
//   rgb_moments: over every pixel x = (r, g, b) of the batch, sums += sum x and
//   outer += sum x x^T (float64, accumulated into the caller's arrays); returns the pixel
//   count.  The batch is cut into chunks of <= 32768 pixels of one image; each chunk is
//   summed on one thread (uint8: in uint32, exact since 32768 * 255^2 < 2^32; float: in
//   double), then the chunk sums are added in chunk order, so the result does not depend on
//   the number of threads (and is exact for uint8 while the totals stay below 2^53).
#include "common.hpp"

#include <omp.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using pycnn::kParallelMinElements;
using std::int64_t;
using std::uint32_t;
using std::uint64_t;
using std::uint8_t;

constexpr int64_t kMomentChunk = 32768;  // pixels per chunk: 32768 * 255 * 255 < 2^32
constexpr int kMoments = 9;              // r, g, b, rr, rg, rb, gg, gb, bb

// ------------------------------------------------------------------------------- kernels

// delta (N, 3) in double: scale * eigvecs @ (alphas[n] * eigvals)
std::vector<double> colour_offsets(const double* eigvecs, const double* eigvals, const double* alphas, int64_t N,
                                   double scale) {
    std::vector<double> delta(static_cast<size_t>(N * 3));
    for (int64_t n = 0; n < N; ++n) {
        const double w0 = alphas[n * 3 + 0] * eigvals[0];
        const double w1 = alphas[n * 3 + 1] * eigvals[1];
        const double w2 = alphas[n * 3 + 2] * eigvals[2];
        for (int64_t c = 0; c < 3; ++c) {
            const double* v = eigvecs + c * 3;
            delta[static_cast<size_t>(n * 3 + c)] = (v[0] * w0 + v[1] * w1 + v[2] * w2) * scale;
        }
    }
    return delta;
}

// images and out are (P, S): P = N*3 planes of S pixels; delta is (P,).
template <typename In, typename Out>
void fancy_pca_apply_kernel(const In* images, const double* delta, Out* out, int64_t P, int64_t S) {
#pragma omp parallel for schedule(static) if (P * S >= kParallelMinElements)
    for (int64_t p = 0; p < P; ++p) {
        const In* src = images + p * S;
        Out* dst = out + p * S;
        const Out d = static_cast<Out>(delta[p]);
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) dst[s] = static_cast<Out>(src[s]) + d;
    }
}

// Sums of one chunk: the S pixels r[s], g[s], b[s] of one image.  Acc is uint32 for uint8
// (exact: S <= kMomentChunk), double for float.
template <typename In, typename Acc>
void chunk_moments(const In* r, const In* g, const In* b, int64_t S, double* partial) {
    Acc a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8)
    for (int64_t s = 0; s < S; ++s) {
        const Acc x = static_cast<Acc>(r[s]), y = static_cast<Acc>(g[s]), z = static_cast<Acc>(b[s]);
        a0 += x;
        a1 += y;
        a2 += z;
        a3 += x * x;
        a4 += x * y;
        a5 += x * z;
        a6 += y * y;
        a7 += y * z;
        a8 += z * z;
    }
    const Acc acc[kMoments] = {a0, a1, a2, a3, a4, a5, a6, a7, a8};
    for (int t = 0; t < kMoments; ++t) partial[t] = static_cast<double>(acc[t]);
}

// images (N, 3, S) -> moments[9] (overwritten) in the order of kMoments.
template <typename In, typename Acc>
void rgb_moments_kernel(const In* images, int64_t N, int64_t S, double* moments) {
    const int64_t per_image = (S + kMomentChunk - 1) / kMomentChunk;
    const int64_t chunks = N * per_image;
    std::vector<double> partials(static_cast<size_t>(chunks * kMoments));
    double* part = partials.data();
#pragma omp parallel for schedule(static) if (N * S >= kParallelMinElements)
    for (int64_t q = 0; q < chunks; ++q) {
        const int64_t n = q / per_image, lo = (q % per_image) * kMomentChunk;
        const int64_t len = S - lo < kMomentChunk ? S - lo : kMomentChunk;
        const In* plane = images + n * 3 * S + lo;
        chunk_moments<In, Acc>(plane, plane + S, plane + 2 * S, len, part + q * kMoments);
    }
    for (int t = 0; t < kMoments; ++t) moments[t] = 0.0;
    for (int64_t q = 0; q < chunks; ++q) {  // in chunk order: independent of the thread count
        for (int t = 0; t < kMoments; ++t) moments[t] += part[q * kMoments + t];
    }
}

// --------------------------------------------------------------------------- bindings
using pycnn::as_array;
using pycnn::dtype_name;
using pycnn::shape_str;

bool is_uint8(const py::array& a) { return a.dtype().equal(py::dtype::of<uint8_t>()); }

// images: (N, 3, H, W), uint8, float32 or float64.
py::array as_images(const char* fn, const py::object& obj) {
    py::array a = as_array(fn, "images", obj);
    if (!is_uint8(a) && !pycnn::is_float32(a) && !pycnn::is_float64(a)) {
        throw py::type_error(std::string(fn) + ": images must be uint8, float32 or float64, got " + dtype_name(a));
    }
    if (a.ndim() != 4 || a.shape(1) != 3) {
        throw py::value_error(std::string(fn) + ": images must be RGB images (N, 3, H, W), got shape " + shape_str(a));
    }
    return a;
}

// A float64 array of the given shape (the small parameters of the op).
py::array as_float64(const char* fn, const char* name, const py::object& obj, std::vector<py::ssize_t> shape,
                     const std::string& shape_text, bool writeable = false) {
    py::array a = as_array(fn, name, obj, writeable);
    if (!pycnn::is_float64(a)) {
        throw py::type_error(std::string(fn) + ": " + name + " must be float64, got " + dtype_name(a));
    }
    if (pycnn::shape_of(a) != shape) {
        throw py::value_error(std::string(fn) + ": " + name + " must have shape " + shape_text + ", got " +
                              shape_str(a));
    }
    return a;
}

void define(py::module_& m) {
    m.def(
        "fancy_pca_apply",
        [](const py::object& images_obj, const py::object& eigvecs_obj, const py::object& eigvals_obj,
           const py::object& alphas_obj, double scale, const py::object& out_obj) {
            const char* fn = "fancy_pca_apply";
            py::array images = as_images(fn, images_obj);
            const int64_t N = images.shape(0), S = images.shape(2) * images.shape(3);
            py::array eigvecs = as_float64(fn, "eigvecs", eigvecs_obj, {3, 3}, "(3, 3)");
            py::array eigvals = as_float64(fn, "eigvals", eigvals_obj, {3}, "(3,)");
            py::array alphas = as_float64(fn, "alphas", alphas_obj, {static_cast<py::ssize_t>(N), 3},
                                          "(N, 3) = (" + std::to_string(N) + ", 3)");
            py::array out = as_array(fn, "out", out_obj, /*writeable=*/true);
            const bool want64 = pycnn::is_float64(images);
            if (want64 ? !pycnn::is_float64(out) : !pycnn::is_float32(out)) {
                throw py::type_error(std::string(fn) + ": out must be " + (want64 ? "float64" : "float32") +
                                     " for " + dtype_name(images) + " images, got " + dtype_name(out));
            }
            pycnn::check_same_shape(fn, "out", out, "images", images);
            const auto* in = images.data();
            auto* o = out.mutable_data();
            const auto* v = static_cast<const double*>(eigvecs.data());
            const auto* l = static_cast<const double*>(eigvals.data());
            const auto* a = static_cast<const double*>(alphas.data());
            const bool u8 = is_uint8(images);
            py::gil_scoped_release nogil;
            const std::vector<double> delta = colour_offsets(v, l, a, N, scale);
            if (u8) {
                fancy_pca_apply_kernel(static_cast<const uint8_t*>(in), delta.data(), static_cast<float*>(o), N * 3, S);
            } else if (want64) {
                fancy_pca_apply_kernel(static_cast<const double*>(in), delta.data(), static_cast<double*>(o), N * 3, S);
            } else {
                fancy_pca_apply_kernel(static_cast<const float*>(in), delta.data(), static_cast<float*>(o), N * 3, S);
            }
        },
        py::arg("images"), py::arg("eigvecs"), py::arg("eigvals"), py::arg("alphas"), py::arg("scale"), py::arg("out"),
        "images (N, 3, H, W) uint8/float32/float64; eigvecs (3, 3) (eigenvectors in columns), eigvals (3,), "
        "alphas (N, 3), all float64: out = images + scale * eigvecs @ (alphas[n] * eigvals) per image "
        "(out float32 for uint8 and float32 images, float64 for float64).");
    m.def(
        "rgb_moments",
        [](const py::object& images_obj, const py::object& sums_obj, const py::object& outer_obj) -> int64_t {
            const char* fn = "rgb_moments";
            py::array images = as_images(fn, images_obj);
            py::array sums = as_float64(fn, "sums", sums_obj, {3}, "(3,)", true);
            py::array outer = as_float64(fn, "outer", outer_obj, {3, 3}, "(3, 3)", true);
            const int64_t N = images.shape(0), S = images.shape(2) * images.shape(3);
            double moments[kMoments];
            const void* in = images.data();
            auto* sp = static_cast<double*>(sums.mutable_data());
            auto* op = static_cast<double*>(outer.mutable_data());
            const bool u8 = is_uint8(images), f32 = pycnn::is_float32(images);  // dtype checks need the GIL
            {
                py::gil_scoped_release nogil;
                if (u8) {
                    rgb_moments_kernel<uint8_t, uint32_t>(static_cast<const uint8_t*>(in), N, S, moments);
                } else if (f32) {
                    rgb_moments_kernel<float, double>(static_cast<const float*>(in), N, S, moments);
                } else {
                    rgb_moments_kernel<double, double>(static_cast<const double*>(in), N, S, moments);
                }
            }
            constexpr int kOuterIndex[9] = {3, 4, 5, 4, 6, 7, 5, 7, 8};  // (3, 3) row-major -> moment
            for (int c = 0; c < 3; ++c) sp[c] += moments[c];
            for (int t = 0; t < 9; ++t) op[t] += moments[kOuterIndex[t]];
            return N * S;
        },
        py::arg("images"), py::arg("sums"), py::arg("outer"),
        "images (N, 3, H, W) uint8/float32/float64: sums (3,) += the sum of every pixel's RGB vector x, "
        "outer (3, 3) += the sum of x x^T (both float64, accumulated); returns the pixel count N*H*W.");
}

const pycnn::Bindings bindings(define);

}  // namespace
