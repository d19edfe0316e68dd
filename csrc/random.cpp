// The counter-based random numbers of common.hpp (seed_key, uniform01) exposed to Python, so
// that tests can check them bit for bit against pycnn/ops/_util.py.
#include "common.hpp"

#include <cstdint>
#include <string>

namespace {

using std::int64_t;
using std::uint64_t;

void define(py::module_& m) {
    m.def("seed_key", &pycnn::seed_key, py::arg("seed"),
          "The 64-bit stream key of a seed (as pycnn.ops._util.seed_key).");
    m.def(
        "counter_uniform",
        [](uint64_t seed, int64_t n, const py::object& dtype_obj) -> py::array {
            if (n < 0) throw py::value_error("counter_uniform: n must be >= 0, got " + std::to_string(n));
            const py::dtype dtype = py::dtype::from_args(dtype_obj);
            const uint64_t key = pycnn::seed_key(seed);
            auto fill = [&](auto zero) -> py::array {
                using T = decltype(zero);
                py::array_t<T> out(static_cast<py::ssize_t>(n));
                T* p = out.mutable_data();
                {
                    py::gil_scoped_release nogil;
#pragma omp parallel for simd schedule(static) if (n >= pycnn::kParallelMinElements)
                    for (int64_t i = 0; i < n; ++i) p[i] = pycnn::uniform01<T>(key, static_cast<uint64_t>(i));
                }
                return std::move(out);
            };
            if (dtype.equal(py::dtype::of<float>())) return fill(float{});
            if (dtype.equal(py::dtype::of<double>())) return fill(double{});
            throw py::type_error("counter_uniform: dtype must be float32 or float64, got " +
                                 py::str(dtype).cast<std::string>());
        },
        py::arg("seed"), py::arg("n"), py::arg("dtype") = py::dtype::of<float>(),
        "n counter-based U[0, 1) numbers for seed (as pycnn.ops._util.uniform; a test helper: it allocates).");
}

const pycnn::Bindings bindings(define);

}  // namespace
