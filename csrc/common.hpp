// Shared helpers of the bindings of the C++ backend (pycnn._C): argument checks, dtype
// dispatch and the registration function of every source file (kernel_base.hpp: what the
// kernels share without Python).
#pragma once

#include "kernel_base.hpp"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace pycnn {

// ------------------------------------------------------------------ module registration
// Every source file defines its bindings in a function of its own and registers it with a
// static object, `const pycnn::Bindings bindings(define);`, constructed when the extension is
// loaded; module.cpp calls them all (define_registered_bindings).  A new file (CMakeLists.txt
// globs csrc/*.cpp) needs no edit anywhere else.
using DefineFn = void (*)(py::module_&);

// The items of type Item that static objects of every file add while the extension loads (a
// function-local static: objects of other files are constructed before or after this one's,
// in an order C++ leaves open).  Bindings here, conv3x3_act's activations (activation.hpp).
template <typename Item>
std::vector<Item>& registered() {
    static std::vector<Item> items;
    return items;
}

struct Bindings {
    explicit Bindings(DefineFn define);
};

void define_registered_bindings(py::module_& m);  // module.cpp

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

// The data of a checked array as T (T matches its dtype).
template <typename T>
inline const T* data_of(const py::array& a) { return static_cast<const T*>(a.data()); }
template <typename T>
inline T* mutable_data_of(py::array& a) { return static_cast<T*>(a.mutable_data()); }

// ------------------------------------------------------------------- map bindings
// The checks and the dtype dispatch of the elementwise kernels; launch(...) runs with the GIL
// released, on T* pointers of the dtype of the first array.

// out = f(a): a any shape (named `a_name`), out preallocated like a.  launch(a, out, n).
template <typename Launch>
void map_call(const char* fn, const char* a_name, const py::object& a_obj, const char* out_name,
              const py::object& out_obj, Launch launch) {
    py::array a = as_float_array(fn, a_name, a_obj);
    py::array out = as_array_like(fn, out_name, out_obj, a_name, a, /*writeable=*/true);
    check_same_shape(fn, out_name, out, a_name, a);
    const std::int64_t n = static_cast<std::int64_t>(a.size());
    dispatch_float(a, [&](auto zero) {
        using T = decltype(zero);
        const T* ap = data_of<T>(a);
        T* op = mutable_data_of<T>(out);
        py::gil_scoped_release nogil;
        launch(ap, op, n);
    });
}

// grad_in = f(x, grad_out): all three shaped like x (the saved input).  launch(x, grad_out, grad_in, n).
template <typename Launch>
void map_backward_call(const char* fn, const py::object& x_obj, const py::object& g_obj, const py::object& gi_obj,
                       Launch launch) {
    py::array x = as_float_array(fn, "x", x_obj);
    py::array g = as_array_like(fn, "grad_out", g_obj, "x", x);
    py::array gi = as_array_like(fn, "grad_in", gi_obj, "x", x, /*writeable=*/true);
    check_same_shape(fn, "grad_out", g, "x", x);
    check_same_shape(fn, "grad_in", gi, "x", x);
    const std::int64_t n = static_cast<std::int64_t>(x.size());
    dispatch_float(x, [&](auto zero) {
        using T = decltype(zero);
        const T* xp = data_of<T>(x);
        const T* gp = data_of<T>(g);
        T* gip = mutable_data_of<T>(gi);
        py::gil_scoped_release nogil;
        launch(xp, gp, gip, n);
    });
}

// The element type of a pointer launch(...) receives.
template <typename P>
using element_t = std::remove_cv_t<std::remove_pointer_t<P>>;

}  // namespace pycnn
