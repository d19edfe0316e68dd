// The extension module pycnn._C_<variant>: what describes the binary (build_info, its threads,
// its FMA peak) and the bindings every source file registers (pycnn::Bindings, common.hpp).  CMakeLists.txt builds it once per instruction-set variant (PYCNN_MODULE_NAME
// _C_avx512, _C_avx2, _C_generic); pycnn/_C.py imports the one the CPU runs.
#include "common.hpp"

#include <omp.h>

#include <cstdint>
#include <string>
#include <vector>

#ifndef PYCNN_MODULE_NAME
#define PYCNN_MODULE_NAME _C
#endif
#ifndef PYCNN_VARIANT
#define PYCNN_VARIANT "unknown"
#endif

namespace pycnn {

double fma_peak_gflops(std::int64_t iters);  // fma_peak.cpp

Bindings::Bindings(DefineFn define) { registered<DefineFn>().push_back(define); }

void define_registered_bindings(py::module_& m) {
    for (DefineFn define : registered<DefineFn>()) define(m);
}

}  // namespace pycnn

// What this binary was compiled for: pycnn.cpu_info() reports it, .ci/sanitize.sh checks it.
static py::dict build_info() {
    py::dict build;
    build["variant"] = PYCNN_VARIANT;
#if defined(PYCNN_SANITIZE)
    build["sanitize"] = true;
#else
    build["sanitize"] = false;
#endif
    py::list isa;
#if defined(__AVX512F__)
    isa.append("avx512f");
#endif
#if defined(__AVX512BW__)
    isa.append("avx512bw");
#endif
#if defined(__AVX512DQ__)
    isa.append("avx512dq");
#endif
#if defined(__AVX512VL__)
    isa.append("avx512vl");
#endif
#if defined(__AVX2__)
    isa.append("avx2");
#endif
#if defined(__FMA__)
    isa.append("fma");
#endif
#if defined(__ARM_NEON)
    isa.append("neon");
#endif
    build["isa"] = isa;
#if defined(__VERSION__)
    build["compiler"] = __VERSION__;
#endif
    build["openmp"] = _OPENMP;
    return build;
}

PYBIND11_MODULE(PYCNN_MODULE_NAME, m) {
    m.doc() = "pycnn C++ backend: OpenMP + SIMD CPU kernels on NumPy arrays (outputs are passed in).";

    m.def("build_info", &build_info,
          "What this binary was compiled for: variant, instruction sets, sanitizers, compiler, OpenMP.");

    m.def("num_threads", []() { return omp_get_max_threads(); },
          "The number of OpenMP threads the kernels use (omp_get_max_threads).");
    m.def(
        "set_num_threads",
        [](int n) {
            if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
            omp_set_num_threads(n);
        },
        py::arg("n"), "Set the number of OpenMP threads for kernels called from this Python thread.");

    m.def(
        "fma_peak_gflops",
        [](std::int64_t iters) {
            if (iters < 1) throw py::value_error("fma_peak_gflops: iters must be >= 1, got " + std::to_string(iters));
            py::gil_scoped_release nogil;
            return pycnn::fma_peak_gflops(iters);
        },
        py::arg("iters") = 10000000,
        "The float32 FMA peak of the OpenMP threads in GFLOP/s (24 independent AVX-512 FMA chains per "
        "thread, or 12 AVX2 ones, timed); NaN without either.  The limit bench/test_conv_pool.py compares conv3x3 to.");

    pycnn::define_registered_bindings(m);  // every file's pycnn::Bindings (common.hpp)
}
