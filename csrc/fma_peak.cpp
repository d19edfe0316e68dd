// The float32 FMA peak of this machine: the limit bench/test_conv_pool.py compares conv3x3 to
// (fma_peak_gflops; its binding is in module.cpp, so that this file compiles without pybind11).

#include <omp.h>

#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#define PYCNN_FMA_AVX512 1
#else
#define PYCNN_FMA_AVX512 0
#endif

namespace pycnn {

using std::int64_t;

// The peak float32 FMA rate of this machine on the OpenMP threads (GFLOP/s): independent FMA
// chains per thread (24 zmm with AVX-512, 12 ymm with AVX2 + FMA), `iters` times, timed.  The
// limit the conv benchmarks compare to: the peak of the instruction set this binary runs.
// NaN where the binary has neither.
double fma_peak_gflops(int64_t iters) {
#if defined(__GNUC__) && (PYCNN_FMA_AVX512 || (defined(__AVX2__) && defined(__FMA__)))
    int threads = 1;
    const double start = omp_get_wtime();
#pragma omp parallel
    {
#pragma omp single
        threads = omp_get_num_threads();
        for (int64_t it = 0; it < iters; ++it) {
#if PYCNN_FMA_AVX512
            __asm__ volatile(
#define PYCNN_FMA(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n\t"
                PYCNN_FMA(0) PYCNN_FMA(1) PYCNN_FMA(2) PYCNN_FMA(3) PYCNN_FMA(4) PYCNN_FMA(5) PYCNN_FMA(6)
                PYCNN_FMA(7) PYCNN_FMA(8) PYCNN_FMA(9) PYCNN_FMA(10) PYCNN_FMA(11) PYCNN_FMA(12) PYCNN_FMA(13)
                PYCNN_FMA(14) PYCNN_FMA(15) PYCNN_FMA(16) PYCNN_FMA(17) PYCNN_FMA(18) PYCNN_FMA(19)
                PYCNN_FMA(20) PYCNN_FMA(21) PYCNN_FMA(22) PYCNN_FMA(23)
#undef PYCNN_FMA
                :
                :
                : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
                  "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21",
                  "xmm22", "xmm23");
#else
            __asm__ volatile(
#define PYCNN_FMA(i) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #i "\n\t"
                PYCNN_FMA(0) PYCNN_FMA(1) PYCNN_FMA(2) PYCNN_FMA(3) PYCNN_FMA(4) PYCNN_FMA(5) PYCNN_FMA(6)
                PYCNN_FMA(7) PYCNN_FMA(8) PYCNN_FMA(9) PYCNN_FMA(10) PYCNN_FMA(11)
#undef PYCNN_FMA
                :
                :
                : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
#endif
        }
    }
    const double seconds = omp_get_wtime() - start;
#if PYCNN_FMA_AVX512
    constexpr double kFlopsPerIter = 2.0 * 16 * 24;  // 24 FMAs of 16 lanes
#else
    constexpr double kFlopsPerIter = 2.0 * 8 * 12;   // 12 FMAs of 8 lanes
#endif
    return kFlopsPerIter * static_cast<double>(iters) * threads / seconds / 1e9;
#else
    (void)iters;
    return std::numeric_limits<double>::quiet_NaN();
#endif
}

}  // namespace pycnn
