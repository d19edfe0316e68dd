// What the kernels of the C++ backend share, without Python (a kernel file that includes no
// bindings compiles without pybind11's headers: they cost more compile time than most kernels):
// the OpenMP threshold and the counter-based random numbers.
#pragma once

#include <cstdint>

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
}  // namespace pycnn
