// Shared helpers of the C++ backend (pycnn._C): argument checks, dtype dispatch, the
// counter-based random numbers, and the registration function of every source file.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

// ------------------------------------------------------------------ module registration
// module.cpp calls one of these per source file; a new file adds its declaration here.
void register_activations(py::module_& m);
void register_batchnorm(py::module_& m);     // batchnorm.cpp
void register_conv3x3(py::module_& m);  // conv3x3.cpp (+ conv3x3_winograd.cpp)
void register_pool2x2(py::module_& m);  // pool.cpp
void register_maps(py::module_& m);  // maps.cpp: sigmoid, tanh, maxout, dropout
void register_fancy_pca(py::module_& m);  // fancy_pca.cpp

namespace pycnn {

// Loops over fewer elements than this run on one thread: starting the OpenMP team costs
// microseconds, more than a small map costs.
constexpr std::int64_t kParallelMinElements = 32768;

// --------------------------------------------------------------- counter-based randomness
// The same formula as pycnn/ops/_util.py (`seed_key`, `uniform`) and the CUDA kernels:
// element i of a draw with seed s is output i of a splitmix64 stream keyed by s, so the
// numbers do not depend on how the work is split between threads.
//   key = mix(s * GOLDEN + GOLDEN);  z_i = mix(key + (i + 1) * GOLDEN);  u_i = (z_i >> 40) * 2^-24
// All arithmetic is uint64 modulo 2^64.
constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr std::uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr std::uint64_t kMix2 = 0x94D049BB133111EBULL;

inline std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * kMix1;
    z = (z ^ (z >> 27)) * kMix2;
    return z ^ (z >> 31);
}

// The stream key of a seed (computed once per draw).
inline std::uint64_t seed_key(std::uint64_t seed) { return mix(seed * kGolden + kGolden); }

// U[0, 1) number i of the stream `key`: 24 random bits, exactly representable in float32.
template <typename T>
inline T uniform01(std::uint64_t key, std::uint64_t i) {
    const std::uint64_t z = mix(key + (i + 1) * kGolden);
    return static_cast<T>(static_cast<std::int32_t>(z >> 40)) * static_cast<T>(1.0 / 16777216.0);
}

// --------------------------------------------------------------------------- arg checks
// Every message starts with the function and names the argument:
//   "relu_forward: out must have the same shape as x"

inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

inline bool is_float32(const py::array& a) { return a.dtype().equal(py::dtype::of<float>()); }
inline bool is_float64(const py::array& a) { return a.dtype().equal(py::dtype::of<double>()); }

// `obj` as a NumPy array that is C-contiguous and aligned (writeable too where `writeable`).
// The Python wrappers (pycnn/ops/cpp_backend.py, kernel_array) hand every kernel such arrays
// whatever the caller passed; these checks guard direct calls of the private module.
inline py::array as_array(const char* fn, const char* name, const py::object& obj, bool writeable = false) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(fn) + ": " + name + " must be a numpy array, got " +
                             py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
    }
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!(a.flags() & py::array::c_style)) {
        throw py::value_error(std::string(fn) + ": " + name + " must be C-contiguous (np.ascontiguousarray)");
    }
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
        throw py::value_error(std::string(fn) + ": " + name + " must be aligned (np.require(a, None, 'CA'))");
    }
    if (writeable && !a.writeable()) {
        throw py::value_error(std::string(fn) + ": " + name + " must be writeable");
    }
    return a;
}

// A float32 / float64 array in the other byte order: refused with its own message.
inline void check_native_byte_order(const char* fn, const char* name, const py::array& a) {
    if (a.dtype().kind() == 'f' && (a.itemsize() == 4 || a.itemsize() == 8) && !is_float32(a) && !is_float64(a)) {
        throw py::type_error(std::string(fn) + ": " + name + " must be in native byte order, got " + dtype_name(a) +
                             " (a.astype(a.dtype.newbyteorder('=')))");
    }
}

// The first float array of a call: float32 or float64 (native byte order).
inline py::array as_float_array(const char* fn, const char* name, const py::object& obj, bool writeable = false) {
    py::array a = as_array(fn, name, obj, writeable);
    if (!is_float32(a) && !is_float64(a)) {
        check_native_byte_order(fn, name, a);
        throw py::type_error(std::string(fn) + ": " + name + " must be float32 or float64, got " + dtype_name(a));
    }
    return a;
}

// Another array of the call: same dtype as `ref` (called `ref_name`).
inline py::array as_array_like(const char* fn, const char* name, const py::object& obj, const char* ref_name,
                               const py::array& ref, bool writeable = false) {
    py::array a = as_array(fn, name, obj, writeable);
    if (!a.dtype().equal(ref.dtype())) {
        check_native_byte_order(fn, name, a);
        throw py::type_error(std::string(fn) + ": " + name + " must have the same dtype as " + ref_name + " (" +
                             dtype_name(ref) + "), got " + dtype_name(a));
    }
    return a;
}

inline std::vector<py::ssize_t> shape_of(const py::array& a) {
    return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

inline std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        if (d > 0) s += ", ";
        s += std::to_string(a.shape(d));
    }
    return s + (a.ndim() == 1 ? ",)" : ")");
}

inline void check_same_shape(const char* fn, const char* name, const py::array& a, const char* ref_name,
                             const py::array& ref) {
    if (shape_of(a) != shape_of(ref)) {
        throw py::value_error(std::string(fn) + ": " + name + " must have the same shape as " + ref_name + " " +
                              shape_str(ref) + ", got " + shape_str(a));
    }
}

// Calls f(T{}) with T = float or double, the dtype of `a` (checked by as_float_array).
template <typename F>
inline auto dispatch_float(const py::array& a, F&& f) {
    if (is_float32(a)) return f(float{});
    return f(double{});
}

}  // namespace pycnn
