// Inverted dropout in training -- forward and backward, float32 and float64.  The NumPy
// reference in pycnn/ops/dropout.py is the spec.
//
// Element i is kept when uniform01(seed_key(seed), i) >= p (in T, as the reference), kept
// elements are scaled by 1 / (1 - p): y = x * (keep ? scale : 0).  The backward pass draws the
// same mask from the seed (the mask is never stored).  A map over the flat C-order index,
// OpenMP `parallel for simd` with a static schedule; the mask does not depend on the thread
// count (counter-based random numbers: common.hpp).
#include "common.hpp"

#include <cstdint>
#include <string>

namespace {

using std::int64_t;
using std::uint64_t;

// out = v * (keep_i ? scale : 0): x in the forward pass, the incoming gradient in the backward.
template <typename T>
void dropout_kernel(const T* v, T* out, int64_t n, T p, T scale, uint64_t key) {
#pragma omp parallel for simd schedule(static) if (n >= pycnn::kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) {
        const T u = pycnn::uniform01<T>(key, static_cast<uint64_t>(i));
        out[i] = v[i] * (u >= p ? scale : T(0));
    }
}

void check_probability(const char* fn, double p) {
    if (!(p >= 0.0 && p <= 1.0)) {
        throw py::value_error(std::string(fn) + ": p must be a probability in [0, 1], got " + std::to_string(p));
    }
}

// dropout_forward(x, out, p, seed) and dropout_backward(grad_out, grad_in, p, seed): the same map.
void dropout_call(const char* fn, const char* v_name, const py::object& v, const char* out_name,
                  const py::object& out, double p, uint64_t seed) {
    check_probability(fn, p);
    const uint64_t key = pycnn::seed_key(seed);
    pycnn::map_call(fn, v_name, v, out_name, out, [=](auto vp, auto op, int64_t n) {
        using T = pycnn::element_t<decltype(vp)>;
        // p = 1 drops everything (u < 1 <= p); scale 0 there rather than 1 / 0
        const T scale = p < 1.0 ? static_cast<T>(1.0 / (1.0 - p)) : T(0);
        dropout_kernel<T>(vp, op, n, static_cast<T>(p), scale, key);
    });
}

void define(py::module_& m) {
    m.def(
        "dropout_forward",
        [](const py::object& x, const py::object& out, double p, uint64_t seed) {
            dropout_call("dropout_forward", "x", x, "out", out, p, seed);
        },
        py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"),
        "Inverted dropout in training: out = x / (1 - p) where counter_uniform(seed)[i] >= p, else 0.");
    m.def(
        "dropout_backward",
        [](const py::object& grad_out, const py::object& grad_in, double p, uint64_t seed) {
            dropout_call("dropout_backward", "grad_out", grad_out, "grad_in", grad_in, p, seed);
        },
        py::arg("grad_out"), py::arg("grad_in"), py::arg("p"), py::arg("seed"),
        "grad_in = grad_out * the mask of dropout_forward(p, seed), drawn again from the seed.");
}

const pycnn::Bindings bindings(define);

}  // namespace
