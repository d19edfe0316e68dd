// The extension module pycnn._C: one registration function per source file (common.hpp).
#include "common.hpp"

#include <omp.h>

PYBIND11_MODULE(_C, m) {
    m.doc() = "pycnn C++ backend: OpenMP + SIMD CPU kernels on NumPy arrays (outputs are passed in).";

    m.def("num_threads", []() { return omp_get_max_threads(); },
          "The number of OpenMP threads the kernels use (omp_get_max_threads).");
    m.def(
        "set_num_threads",
        [](int n) {
            if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
            omp_set_num_threads(n);
        },
        py::arg("n"), "Set the number of OpenMP threads for kernels called from this Python thread.");

    register_activations(m);
    register_batchnorm(m);
    register_conv3x3(m);
    register_pool2x2(m);
    register_maps(m);
    register_fancy_pca(m);
}
