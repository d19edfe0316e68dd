"""conv3x3 backward-weights of the C++ extension (csrc/conv3x3.cpp, direct_grad_weight).

Paths: C >= 16 the channels-last kernel (x transposed to zero-padded channels-last planes,
blocks of KB output x up to 4 (AVX-512) / 2 (AVX2) vectors of input channels), C < 16 the
pixel-vectorised kernel (gy read in place, x copied to column-shifted planes), float64 the plain
loops.  Each is checked against the NumPy float64 reference (pycnn/ops/conv.py) on random
shapes (C, K in 1..70, H, W in 1..37, N in 1..5) into NaN-prefilled outputs, on shapes that
take the batch in several chunks, for determinism (bitwise equal for 1 and 2 threads and over
repeated calls), and on every instruction-set variant this CPU runs.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from pycnn import _cpu
from pycnn.ops.conv import conv3x3_backward

try:
    from pycnn import _C
except ImportError:  # pragma: no cover - a source checkout without the extension
    _C = None

pytestmark = pytest.mark.skipif(_C is None, reason="the C++ extension is not built")


class _Ctx:
    def __init__(self, x, weight):
        self.saved_tensors = (x, weight)
        self.needs_input_grad = (False, True, False)
        self.has_bias = False


def reference_grad_weight(x, gy):
    """The float64 weight gradient of the NumPy reference (pycnn.ops.conv.conv3x3_backward)."""
    x64, gy64 = x.astype(np.float64), gy.astype(np.float64)
    w = np.zeros((gy.shape[1], x.shape[1], 3, 3))
    return conv3x3_backward(_Ctx(x64, w), gy64)[1]


def scale_of(x, gy):
    """max over (k, c) of sum_{n, p} |gy[n, k, p]| * |x[n, c, p]|: the size of the sums (a bound of
    each tap's sum of |products|), against which the float32 rounding error is measured."""
    n, c, h, w = x.shape
    k = gy.shape[1]
    a = np.abs(gy.astype(np.float64)).reshape(n, k, h * w)
    b = np.abs(x.astype(np.float64)).reshape(n, c, h * w)
    return float(np.einsum("nkp,ncp->kc", a, b).max())


def grad_weight(mod, x, gy, dtype=np.float32):
    x, gy = x.astype(dtype), gy.astype(dtype)
    k, c = gy.shape[1], x.shape[1]
    gw = np.full((k, c, 3, 3), np.nan, dtype)
    mod.conv3x3_grad_weight(x, gy, gw, None)
    return gw


def random_case(rng):
    n = int(rng.integers(1, 6))
    c = int(rng.choice([int(rng.integers(1, 16)), int(rng.integers(16, 71))]))
    k = int(rng.integers(1, 71))
    h = int(rng.choice([1, 2, 3, int(rng.integers(1, 38)) | 1, int(rng.integers(1, 38))]))
    w = int(rng.choice([1, 2, 3, int(rng.integers(1, 38)) | 1, int(rng.integers(1, 38))]))
    return n, c, k, h, w


EDGE_CASES = [
    # (N, C, K, H, W): the path boundary C = 15 / 16, channel tails (Cp = 16 * m, the last block
    # narrower), output-channel tails for KB = 12, 8, 6, 4 and 3, degenerate planes
    (2, 15, 7, 9, 8), (2, 16, 7, 9, 8), (1, 17, 13, 5, 5), (3, 48, 9, 6, 7), (1, 64, 65, 4, 4),
    (2, 65, 70, 3, 5), (1, 70, 1, 7, 1), (2, 80, 5, 1, 9), (5, 3, 32, 32, 32), (1, 1, 1, 1, 1),
    (2, 1, 70, 2, 37), (1, 32, 32, 37, 2), (4, 5, 11, 3, 3), (1, 128, 128, 8, 8), (2, 33, 29, 11, 13),
]


def check_case(mod, case, rng, tol=1e-6):
    n, c, k, h, w = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    gy = rng.standard_normal((n, k, h, w)).astype(np.float32)
    gw = grad_weight(mod, x, gy)
    ref = reference_grad_weight(x, gy)
    assert np.isfinite(gw).all(), f"{case}: NaN left in the output"
    err = np.abs(gw - ref).max() / scale_of(x, gy)
    assert err < tol, f"{case}: relative error {err:.3g} against float64"
    return err


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_edge_shapes_match_the_float64_reference(case):
    check_case(_C, case, np.random.default_rng(sum(case)))


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_match_the_float64_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(10):
        check_case(_C, random_case(rng), rng)


@pytest.mark.parametrize("case", [(290, 16, 3, 37, 37), (130, 15, 4, 37, 37)], ids=["channels_last", "pixels"])
def test_batches_of_several_chunks(case):
    # both paths take the batch in chunks of up to 32 MiB of transposed / shifted planes: these
    # shapes need two, the last one partial
    check_case(_C, case, np.random.default_rng(7))


@pytest.mark.parametrize("case", [(5, 3, 32, 32, 32), (4, 32, 32, 16, 16), (3, 70, 45, 9, 7), (2, 9, 5, 13, 1)])
def test_deterministic_and_independent_of_the_thread_count(case):
    rng = np.random.default_rng(3)
    n, c, k, h, w = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    gy = rng.standard_normal((n, k, h, w)).astype(np.float32)
    before = _C.num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            _C.set_num_threads(threads)
            results.append(grad_weight(_C, x, gy))
    finally:
        _C.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_float64_plain_path_matches_the_reference_and_finite_differences():
    rng = np.random.default_rng(11)
    n, c, k, h, w = 2, 3, 4, 5, 6
    x = rng.standard_normal((n, c, h, w))
    gy = rng.standard_normal((n, k, h, w))
    gw = grad_weight(_C, x, gy, np.float64)
    np.testing.assert_allclose(gw, reference_grad_weight(x, gy), rtol=1e-12, atol=1e-12)
    # gradient check: d/dw sum(conv3x3(x, w) * gy) by central differences (exact up to rounding:
    # the loss is linear in w)
    weight = rng.standard_normal((k, c, 3, 3))
    y = np.empty((n, k, h, w))
    numeric = np.empty_like(weight)
    eps = 1e-3
    for idx in np.ndindex(weight.shape):
        losses = []
        for sign in (1.0, -1.0):
            wp = weight.copy()
            wp[idx] += sign * eps
            _C.conv3x3_forward(x, wp, None, y)
            losses.append(float((y * gy).sum()))
        numeric[idx] = (losses[0] - losses[1]) / (2 * eps)
    np.testing.assert_allclose(gw, numeric, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------ every instruction-set variant

def _runnable_variants():
    features, _ = _cpu.cpu_features()
    return [name for name in _cpu.built_variants() if all(features.get(f, False) for f in _cpu.VARIANTS[name][1])]


def _variant(name):
    if _cpu.extension_dir():
        pytest.skip("PYCNN_EXTENSION_DIR: only the chosen variant is loaded from there")
    if name not in _runnable_variants():
        pytest.skip(f"{name} is not built here or this CPU can't run it")
    return importlib.import_module(_cpu.VARIANTS[name][0])


@pytest.mark.parametrize("name", list(_cpu.VARIANTS))
def test_each_variant_matches_the_float64_reference(name):
    mod = _variant(name)
    rng = np.random.default_rng(5)
    for case in EDGE_CASES + [random_case(rng) for _ in range(15)]:
        check_case(mod, case, rng)


def test_the_channels_last_path_is_bitwise_the_same_on_avx2_and_avx512():
    # every lane sums one input channel over the images and pixels in order, whatever the width
    mods = [_variant(name) for name in ("avx512", "avx2")]
    rng = np.random.default_rng(9)
    for n, c, k, h, w in [(3, 16, 7, 9, 8), (2, 70, 33, 5, 11), (4, 32, 64, 16, 16)]:
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        gy = rng.standard_normal((n, k, h, w)).astype(np.float32)
        np.testing.assert_array_equal(grad_weight(mods[0], x, gy), grad_weight(mods[1], x, gy))
