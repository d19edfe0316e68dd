"""Tests specific to the C++ extension pycnn._C: the counter-based random numbers, the
argument checks, thread-count independence and GIL release.  (The comparison of every op
with its NumPy reference is driven by the registry in test_ops.py.)"""
from __future__ import annotations

import threading

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")

from pycnn.ops import _util, registry  # noqa: E402
from tests.conftest import omp_threads  # noqa: E402

DTYPES = [np.float32, np.float64]
SEEDS = [0, 1, 42, 2**32 + 7, 2**63 + 5, 2**64 - 1]




# --------------------------------------------------------------------- random numbers

@pytest.mark.parametrize("seed", SEEDS)
def test_seed_key_matches_python(seed):
    assert C.seed_key(seed) == _util.seed_key(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [0, 1, 17, 100_003])  # the last one runs on several threads
def test_counter_uniform_matches_python_bit_for_bit(dtype, seed, n):
    expected = _util.uniform(seed, n, np.dtype(dtype))
    for threads in (1, 2):
        with omp_threads(threads):
            got = C.counter_uniform(seed, n, dtype)
        assert got.dtype == np.dtype(dtype) and got.shape == (n,)
        np.testing.assert_array_equal(got, expected)  # the spec is bit for bit
    if n:
        assert got.min() >= 0 and got.max() < 1


def test_counter_uniform_rejects_bad_arguments():
    with pytest.raises(TypeError, match="counter_uniform: dtype"):
        C.counter_uniform(0, 10, np.int32)
    with pytest.raises(ValueError, match="counter_uniform: n"):
        C.counter_uniform(0, -1, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rrelu_training_does_not_depend_on_thread_count(dtype):
    x = np.random.default_rng(0).standard_normal((8, 16, 33, 31)).astype(dtype)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    outs = []
    for threads in (1, 2):
        with omp_threads(threads):
            y, gx = np.full_like(x, np.nan), np.full_like(x, np.nan)
            C.rrelu_forward(x, y, 3.0, 8.0, 99, True)
            C.rrelu_backward(x, g, gx, 3.0, 8.0, 99, True)
            outs.append((y, gx))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    u = _util.uniform(99, x.size, np.dtype(dtype)).reshape(x.shape)
    slope = dtype(1) / (dtype(3.0) + dtype(5.0) * u)
    np.testing.assert_allclose(outs[0][0], np.where(x > 0, x, x * slope), rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 3), (4, 5, 40, 40), (3, 7, 5)])
def test_prelu_weight_gradient_is_overwritten_and_thread_independent(dtype, shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.05, 0.3, shape[1]).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    results = []
    for threads in (1, 2):
        with omp_threads(threads):
            gx, gw = np.full_like(x, np.nan), np.full_like(w, np.nan)
            C.prelu_backward(x, w, g, gx, gw)
            results.append(gw)
    np.testing.assert_array_equal(results[0], results[1])
    axes = (0,) + tuple(range(2, x.ndim))
    expected = np.where(x > 0, 0.0, g.astype(np.float64) * x).sum(axis=axes)
    np.testing.assert_allclose(results[0], expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_empty_arrays():
    x = np.zeros((0, 3, 4), np.float32)
    for fn in (C.relu_forward, C.elu_forward, C.leaky_relu_forward):
        fn(x, np.empty_like(x))
    gw = np.full(3, np.nan, np.float32)
    C.prelu_backward(x, np.ones(3, np.float32), x, np.empty_like(x), gw)
    np.testing.assert_array_equal(gw, 0)


# ---------------------------------------------------------------------- argument checks

def _f32(*shape):
    return np.zeros(shape, np.float32)


def _readonly(n):
    a = np.zeros(n, np.float32)
    a.setflags(write=False)
    return a


BAD_CALLS = [
    # (call, exception, message)
    (lambda: C.relu_forward(_f32(4, 6)[:, ::2], _f32(4, 3)), ValueError, "relu_forward: x must be C-contiguous"),
    (lambda: C.relu_forward(_f32(4, 3), _f32(3, 4).T), ValueError, "relu_forward: out must be C-contiguous"),
    (lambda: C.relu_forward(np.zeros((4, 3), np.int64), _f32(4, 3)), TypeError,
     "relu_forward: x must be float32 or float64, got int64"),
    (lambda: C.relu_forward(_f32(4, 3), np.zeros((4, 3))), TypeError,
     "relu_forward: out must have the same dtype as x"),
    (lambda: C.relu_forward(_f32(4, 3), _f32(3, 4)), ValueError, "relu_forward: out must have the same shape as x"),
    (lambda: C.relu_forward([1.0, 2.0], _f32(2)), TypeError, "relu_forward: x must be a numpy array, got list"),
    (lambda: C.relu_forward(_f32(4), _readonly(4)), ValueError,
     "relu_forward: out must be writeable"),
    (lambda: C.relu_backward(_f32(4, 3), _f32(4, 2), _f32(4, 3)), ValueError,
     "relu_backward: grad_out must have the same shape as x"),
    (lambda: C.relu_backward(_f32(4, 3), _f32(4, 3), np.zeros((4, 3))), TypeError,
     "relu_backward: grad_in must have the same dtype as x"),
    (lambda: C.leaky_relu_backward(_f32(4, 3), np.zeros((4, 3)), _f32(4, 3), 0.1), TypeError,
     "leaky_relu_backward: grad_out must have the same dtype as x"),
    (lambda: C.elu_forward(np.zeros(5, np.float16), np.zeros(5, np.float16), 1.0), TypeError,
     "elu_forward: x must be float32 or float64"),
    (lambda: C.elu_backward(_f32(2, 3), _f32(2, 3), _f32(3, 2), 1.0), ValueError,
     "elu_backward: grad_in must have the same shape as x"),
    (lambda: C.prelu_forward(_f32(2, 3, 4), _f32(4), _f32(2, 3, 4)), ValueError,
     "prelu_forward: weight must have shape"),
    (lambda: C.prelu_forward(_f32(2, 3, 4), _f32(3, 1), _f32(2, 3, 4)), ValueError,
     "prelu_forward: weight must have shape"),
    (lambda: C.prelu_forward(_f32(6), _f32(6), _f32(6)), ValueError,
     "prelu_forward: x must have at least 2 dimensions"),
    (lambda: C.prelu_forward(_f32(2, 3), np.zeros(3), _f32(2, 3)), TypeError,
     "prelu_forward: weight must have the same dtype as x"),
    (lambda: C.prelu_backward(_f32(2, 3), _f32(3), _f32(2, 3), _f32(2, 3), _f32(2)), ValueError,
     "prelu_backward: grad_weight must have the same shape as weight"),
    (lambda: C.prelu_backward(_f32(2, 3), _f32(5), _f32(2, 3), _f32(2, 3), _f32(5)), ValueError,
     "prelu_backward: weight must have shape"),
    (lambda: C.rrelu_forward(_f32(3), _f32(3), 8.0, 3.0, 0, True), ValueError,
     "rrelu_forward: need 0 < lower <= upper"),
    (lambda: C.rrelu_backward(_f32(3), _f32(3), _f32(3, 1), 3.0, 8.0, 0, True), ValueError,
     "rrelu_backward: grad_in must have the same shape as x"),
    (lambda: C.set_num_threads(0), ValueError, "set_num_threads: n must be >= 1"),
]


@pytest.mark.parametrize("call, exc, message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_arguments_raise_naming_the_argument(call, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(")):
        call()


# ------------------------------------------------------------------------------- GIL

def test_kernels_release_the_gil():
    """While one thread runs a long kernel, another keeps executing Python code."""
    x = np.linspace(-3, 3, 1 << 24, dtype=np.float32)
    y = np.empty_like(x)
    started, done = threading.Event(), threading.Event()

    def worker():
        started.set()
        for _ in range(3):
            C.elu_forward(x, y, 1.0)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    ticks = 0
    while not done.is_set():
        ticks += 1
    thread.join()
    assert ticks > 1000, f"the main thread ran only {ticks} loop iterations during the kernel"


# ---------------------------------------------------------------------- registration

def test_cpp_backend_registers_the_rectifiers():
    for name in ("relu", "leaky_relu", "prelu", "rrelu", "elu"):
        assert "default" in registry.get(name).algorithms("cpp")
