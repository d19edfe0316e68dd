"""The C++ batch norm beyond the registry samples: offset data, thread counts, bad input."""
from __future__ import annotations

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")

from pycnn.autograd import Context  # noqa: E402
from pycnn.ops import registry  # noqa: E402
from tests.conftest import omp_threads  # noqa: E402

registry._load_backend("cpp")  # the implementations register on first use; this file reads them directly


def run(impl, x, gamma, beta, **params):
    ctx = Context((True, True, True))
    y = impl.forward(ctx, x, gamma, beta, **params)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype)
    return (y, *impl.backward(ctx, g))


def test_large_mean_small_spread_keeps_float32_accuracy():
    # |mean| / std = 1000: normalising as (x - mean) * scale avoids the cancellation of x * scale + shift
    rng = np.random.default_rng(0)
    x64 = 1000 + rng.standard_normal((16, 8, 12, 12))
    gamma, beta = rng.uniform(0.5, 1.5, 8), rng.standard_normal(8)
    op = registry.get("batchnorm")
    expected = run(op.reference, x64, gamma, beta)
    got = run(op.impls[("cpp", "default")], x64.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=2e-3, atol=2e-3 * np.abs(e).max())


def test_result_does_not_depend_on_the_thread_count():
    x = np.random.default_rng(2).standard_normal((32, 16, 16, 16)).astype(np.float32)
    gamma, beta = np.ones(16, np.float32), np.zeros(16, np.float32)
    impl = registry.get("batchnorm").impls[("cpp", "default")]
    with omp_threads(1):
        one = run(impl, x, gamma, beta)
    with omp_threads(2):
        two = run(impl, x, gamma, beta)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call,words", [
    (lambda: C.batchnorm_stats(np.zeros((2, 3, 4), np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32)),
     "x must have 2 or 4 dimensions"),
    (lambda: C.batchnorm_stats(np.zeros((2, 3), np.float32), np.zeros(4, np.float32), np.zeros(3, np.float32)),
     "mean must have shape (3,)"),
    (lambda: C.batchnorm_apply(np.zeros((2, 3), np.float32), np.zeros(3), np.zeros(3, np.float32),
                               np.zeros(3, np.float32), np.zeros((2, 3), np.float32)), "mean must have the same dtype"),
    (lambda: C.batchnorm_apply(np.zeros((2, 3), np.float32), *[np.zeros(3, np.float32)] * 3,
                               np.zeros((3, 2), np.float32)), "y must have the same shape as x"),
])
def test_bad_input_names_the_argument(call, words):
    with pytest.raises((ValueError, TypeError), match=words.replace("(", r"\(").replace(")", r"\)")):
        call()
