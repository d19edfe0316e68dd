"""Tests of the C++ conv3x3 (direct, Winograd F(2x2, 3x3)) and 2x2 pooling kernels beyond the
registry samples of test_ops.py: larger and odd shapes, partial gradients, non-contiguous
inputs, the Winograd float32 error, max-pooling ties and NaN, argument checks, 'auto'."""
from __future__ import annotations

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")

from pycnn.autograd import Context  # noqa: E402
from pycnn.ops import _util, registry  # noqa: E402
from pycnn.ops.routing import use_backend  # noqa: E402
from tests.conftest import TOLERANCE  # noqa: E402

CONV_ALGOS = ["direct", "winograd"]
DTYPES = [np.float32, np.float64]
# (N, C, K, H, W): tails everywhere (K % 6, H*W % 16, odd H and W, W < 16, C = 3 and C % 64
# for the channels-last grad_weight kernel, C >= 16)
CONV_SHAPES = [(2, 64, 17, 17, 9), (3, 5, 13, 8, 8), (1, 3, 7, 16, 32), (2, 16, 16, 33, 35), (1, 1, 1, 2, 1),
               (2, 37, 7, 6, 5), (1, 70, 3, 5, 9), (2, 3, 20, 9, 7), (1, 5, 70, 6, 5)]

# Winograd float32 error bound (max |error| / max |float64 result|): measured on the benchmark
# layers (N=4, C=K in 3..256, H=W in 8..32, unit-variance x, weights ~ 1/sqrt(9C)) it is
# 1.5e-7 .. 4.1e-7 for y and 3.1e-7 .. 6.2e-7 for grad_x; the direct algorithm gives
# 3.0e-7 .. 3.2e-6 (one long sum per output).  The bound leaves about 10x margin.
WINOGRAD_F32_BOUND = 5e-6


def run(impl, inputs, needs=None, grad_seed=0):
    needs = tuple(x is not None for x in inputs) if needs is None else needs
    ctx = Context(needs)
    with _util.nan_filled_outputs():
        out = np.array(impl.forward(ctx, *inputs), copy=True)
        grad = np.random.default_rng(grad_seed).standard_normal(out.shape).astype(out.dtype)
        grads = impl.backward(ctx, grad)
    return out, grads


def conv_inputs(rng, shape, dtype, bias=True):
    n, c, k, h, w = shape
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype) if bias else None
    return x, weight, b


def cpp(name, algo="default"):
    op = registry.get(name)
    op.algorithms("cpp")  # loads the backend
    return op.impls[("cpp", algo)]


# ----------------------------------------------------------------------------- conv3x3

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", CONV_ALGOS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_conv3x3_matches_reference(shape, algo, dtype, rng):
    inputs = conv_inputs(rng, shape, dtype)
    ref = registry.get("conv3x3").reference
    expected, expected_grads = run(ref, inputs)
    out, grads = run(cpp("conv3x3", algo), inputs)
    tol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(out, expected, **tol, err_msg="y")
    for name, g, e in zip(("grad_x", "grad_weight", "grad_bias"), grads, expected_grads):
        assert g.dtype == np.dtype(dtype)
        scale = np.abs(e).max()  # sums over many terms: compare relative to the largest
        np.testing.assert_allclose(g / scale, e / scale, **tol, err_msg=name)


@pytest.mark.parametrize("algo", CONV_ALGOS)
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (False, False, False)])
def test_conv3x3_computes_only_the_requested_gradients(algo, needs, rng):
    inputs = conv_inputs(rng, (2, 4, 5, 6, 7), np.float64)
    _, expected = run(registry.get("conv3x3").reference, inputs)
    _, grads = run(cpp("conv3x3", algo), inputs, needs=needs)
    for want, g, e in zip(needs, grads, expected):
        if want:
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
        else:
            assert g is None


@pytest.mark.parametrize("algo", CONV_ALGOS)
def test_conv3x3_without_bias(algo, rng):
    inputs = conv_inputs(rng, (2, 3, 8, 9, 5), np.float64, bias=False)
    expected, expected_grads = run(registry.get("conv3x3").reference, inputs)
    out, grads = run(cpp("conv3x3", algo), inputs)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert grads[2] is None
    np.testing.assert_allclose(grads[1], expected_grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algo", CONV_ALGOS)
def test_conv3x3_float32_error_is_bounded(algo, rng):
    # x (4, 64, 16, 16), weight (64, 64, 3, 3): error vs float64 on the same float32 inputs
    x, weight, b = conv_inputs(rng, (4, 64, 64, 16, 16), np.float32)
    ref = registry.get("conv3x3").reference
    expected, expected_grads = run(ref, tuple(a.astype(np.float64) for a in (x, weight, b)))
    out, grads = run(cpp("conv3x3", algo), (x, weight, b))
    for name, got, want in (("y", out, expected), ("grad_x", grads[0], expected_grads[0])):
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < WINOGRAD_F32_BOUND, f"{algo} {name}: relative error {error:.2e}"


@pytest.mark.parametrize("algo", CONV_ALGOS)
def test_conv3x3_takes_non_contiguous_inputs(algo, rng):
    base = rng.standard_normal((2, 9, 11, 6))
    x = base.transpose(0, 3, 1, 2)[:, :, :, ::2]  # (2, 6, 9, 6), strided
    weight = rng.standard_normal((4, 3, 3, 6)).transpose(0, 3, 1, 2)  # (4, 6, 3, 3)
    assert not x.flags.c_contiguous and not weight.flags.c_contiguous
    inputs = (x, weight, rng.standard_normal(4))
    expected, expected_grads = run(registry.get("conv3x3").reference, inputs)
    out, grads = run(cpp("conv3x3", algo), inputs)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_conv3x3_rejects_bad_arguments():
    x = np.zeros((2, 3, 5, 5), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    y = np.zeros((2, 4, 5, 5), np.float32)
    with pytest.raises(TypeError, match="conv3x3_forward: x must be float32 or float64"):
        C.conv3x3_forward(x.astype(np.int32), w, None, y)
    with pytest.raises(TypeError, match="conv3x3_forward: weight must have the same dtype as x"):
        C.conv3x3_forward(x, w.astype(np.float64), None, y)
    with pytest.raises(ValueError, match="conv3x3_forward: x must be C-contiguous"):
        C.conv3x3_forward(x[:, :, :, ::2], w, None, y)
    with pytest.raises(ValueError, match=r"conv3x3_forward: weight must be \(K, C, 3, 3\)"):
        C.conv3x3_forward(x, np.zeros((4, 2, 3, 3), np.float32), None, y)
    with pytest.raises(ValueError, match="conv3x3_forward: bias must have shape"):
        C.conv3x3_forward(x, w, np.zeros(5, np.float32), y)
    with pytest.raises(ValueError, match="conv3x3_forward: y must have shape"):
        C.conv3x3_forward(x, w, None, np.zeros((2, 4, 5, 4), np.float32))
    with pytest.raises(ValueError, match="conv3x3_forward: y must be writeable"):
        y.flags.writeable = False
        C.conv3x3_forward(x, w, None, y)
    y.flags.writeable = True
    with pytest.raises(ValueError, match="conv3x3_forward: algo must be"):
        C.conv3x3_forward(x, w, None, y, "fft")
    with pytest.raises(TypeError, match="conv3x3_forward: x must be a numpy array"):
        C.conv3x3_forward([1.0], w, None, y)
    with pytest.raises(ValueError, match="conv3x3_grad_x: grad_y must have shape"):
        C.conv3x3_grad_x(np.zeros((2, 3, 5, 5), np.float32), w, np.zeros_like(x))
    with pytest.raises(ValueError, match=r"conv3x3_grad_x: weight must be \(K, C, 3, 3\)"):
        C.conv3x3_grad_x(y, w, np.zeros((2, 2, 5, 5), np.float32))
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="conv3x3_grad_x: grad_x must be writeable"):
        C.conv3x3_grad_x(y, w, read_only)
    with pytest.raises(ValueError, match="conv3x3_grad_weight: grad_weight must have shape"):
        C.conv3x3_grad_weight(x, y, np.zeros((4, 3, 3, 2), np.float32), None)
    with pytest.raises(ValueError, match="conv3x3_grad_weight: grad_bias must have shape"):
        C.conv3x3_grad_weight(x, y, None, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"conv3x3_grad_weight: grad_y must be \(N, K, H, W\)"):
        C.conv3x3_grad_weight(x, np.zeros((2, 4, 5, 4), np.float32), None, None)
    with pytest.raises(ValueError, match="conv3x3_grad_weight: algo must be"):
        C.conv3x3_grad_weight(x, y, None, None, "fft")
    with pytest.raises(ValueError, match="conv3x3_forward: x and weight must not be empty"):
        C.conv3x3_forward(np.zeros((0, 3, 5, 5), np.float32), w, None, np.zeros((0, 4, 5, 5), np.float32))


def test_conv3x3_unknown_algorithm_is_a_clear_error(rng):
    x, weight, b = conv_inputs(rng, (1, 2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="algo 'fft' is not available on backend 'cpp'"):
        registry.get("conv3x3").resolve((x, weight, b), {}, algo="fft")


@pytest.mark.parametrize("shape", [(32, 3, 64, 32, 32), (32, 64, 64, 32, 32), (32, 256, 256, 8, 8), (1, 1, 1, 1, 1),
                                   (2, 64, 17, 17, 9)], ids=str)
def test_conv3x3_auto_picks_an_available_algorithm(shape):
    n, c, k, h, w = shape
    x, weight, b = np.zeros((n, c, h, w), np.float32), np.zeros((k, c, 3, 3), np.float32), np.zeros(k, np.float32)
    with use_backend("cpp"):
        backend, algo, impl = registry.get("conv3x3").resolve((x, weight, b), {}, algo="auto")
    assert backend == "cpp" and algo in registry.get("conv3x3").algorithms("cpp")
    assert impl is registry.get("conv3x3").impls[("cpp", algo)]


def test_conv3x3_does_not_depend_on_thread_count(rng):
    x, weight, b = conv_inputs(rng, (4, 8, 9, 10, 11), np.float32)
    before = C.num_threads()
    results = []
    try:
        for threads in (1, 2):
            C.set_num_threads(threads)
            for algo in CONV_ALGOS:
                results.append(run(cpp("conv3x3", algo), (x, weight, b)))
    finally:
        C.set_num_threads(before)
    for (o1, g1), (o2, g2) in zip(results[:2], results[2:]):
        np.testing.assert_array_equal(o1, o2)
        for a, e in zip(g1, g2):
            np.testing.assert_array_equal(a, e)


# ------------------------------------------------------------------------------ pooling

POOL_SHAPES = [(2, 5, 9, 35), (3, 4, 32, 32), (1, 2, 2, 3), (2, 3, 17, 16), (1, 2, 6, 16)]  # W = 16: row pairs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["max_pool2x2", "avg_pool2x2"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_pool_matches_reference(name, shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    expected, (expected_grad,) = run(registry.get(name).reference, (x,))
    out, (grad,) = run(cpp(name), (x,))
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_maxpool_ties_and_nan_follow_the_reference(shape, dtype, rng):
    x = rng.integers(-1, 2, shape).astype(dtype)  # many ties
    x.reshape(-1)[::7] = np.nan
    x.reshape(-1)[3::11] = np.inf
    expected, (expected_grad,) = run(registry.get("max_pool2x2").reference, (x,))
    out, (grad,) = run(cpp("max_pool2x2"), (x,))
    np.testing.assert_array_equal(out, expected)  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(grad, expected_grad)


def test_pool_rejects_bad_arguments():
    x = np.zeros((2, 3, 6, 6), np.float32)
    y = np.zeros((2, 3, 3, 3), np.float32)
    arg = np.zeros((2, 3, 3, 3), np.uint8)
    with pytest.raises(TypeError, match="maxpool2x2_forward: argmax must be uint8"):
        C.maxpool2x2_forward(x, y, arg.astype(np.int32))
    with pytest.raises(ValueError, match="maxpool2x2_forward: y must have shape"):
        C.maxpool2x2_forward(x, np.zeros((2, 3, 3, 2), np.float32), arg)
    with pytest.raises(ValueError, match=r"maxpool2x2_forward: x must be \(N, C, H, W\)"):
        C.maxpool2x2_forward(np.zeros((2, 3, 1, 6), np.float32), y, arg)
    with pytest.raises(ValueError, match="avgpool2x2_backward: grad_y must have shape"):
        C.avgpool2x2_backward(np.zeros((2, 3, 3, 4), np.float32), x)
    with pytest.raises(TypeError, match="maxpool2x2_backward: grad_y must have the same dtype as grad_x"):
        C.maxpool2x2_backward(y.astype(np.float64), arg, x)
    with pytest.raises(ValueError, match="avgpool2x2_forward: x must be C-contiguous"):
        C.avgpool2x2_forward(x[:, :, :, ::2], np.zeros((2, 3, 3, 1), np.float32))
