"""Winograd F(4x4, 3x3) ("winograd4", csrc/conv3x3_winograd4.cpp) for conv3x3 and conv3x3_act
on the C++ backend: float64 against the NumPy reference (tight), float32 within its measured
error, outputs prefilled with NaN and never written outside, odd and tiny H and W (tiles that
straddle the edges), rows of more than 128 tiles, a finite-difference check of grad_x, the
thread count, batches of several image groups (grad_weight), the fused activations, and the
auto rule."""
from __future__ import annotations

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")

from pycnn.autograd import Context  # noqa: E402
from pycnn.ops import _util, conv, cpp_backend, registry  # noqa: E402
from tests.conftest import omp_threads  # noqa: E402

# (N, C, K, H, W): H, W of 1, 2, 3, 5 and odd sizes (tiles past the bottom and right edges),
# multiples of 4, K % 6 (GEMM row blocks), chunk tails, C = 1
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 4, 2, 3), (1, 5, 7, 5, 5), (3, 2, 13, 7, 9), (2, 17, 6, 8, 8),
          (1, 8, 70, 13, 1), (2, 33, 5, 3, 37), (1, 64, 17, 17, 9), (2, 16, 16, 33, 35), (1, 70, 3, 12, 4)]

# float32 error of F(4x4, 3x3), max |error| / max |float64 result| on the same float32 inputs:
# measured 3e-6 .. 1.0e-5 for y and grad_x on the six layers of the README net (batch 8, He
# weights, N(0, 1) inputs; relative RMS 1.3e-6 .. 2.5e-6), against 0.2e-6 .. 1.2e-6 for the
# direct kernel and 0.2e-6 .. 0.6e-6 for F(2x2, 3x3).  The bounds leave 5x margin.
WINOGRAD4_F32_MAX_BOUND = 5e-5
WINOGRAD4_F32_RMS_BOUND = 1e-5


def _inputs(rng, shape, dtype, bias=True):
    n, c, k, h, w = shape
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = (rng.standard_normal((k, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(dtype)
    b = rng.standard_normal(k).astype(dtype) if bias else None
    return x, weight, b


def _impl(name, algo):
    op = registry.get(name)
    op.algorithms("cpp")  # (loads the backend)
    return op.impls[("cpp", algo)]


def _run(impl, inputs, params=None, needs=None, grad_seed=0):
    needs = tuple(a is not None for a in inputs) if needs is None else needs
    ctx = Context(needs)
    with _util.nan_filled_outputs():
        out = np.array(impl.forward(ctx, *inputs, **(params or {})), copy=True)
        grad = np.random.default_rng(grad_seed).standard_normal(out.shape).astype(out.dtype)
        grads = impl.backward(ctx, grad)
    return out, grads


def _relative_errors(got, want):
    error = np.abs(got.astype(np.float64) - want)
    scale = np.abs(want).max()
    return error.max() / scale, np.sqrt((error ** 2).mean() / (want ** 2).mean())


# ----------------------------------------------------------------------------- conv3x3

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_matches_the_reference(shape, rng):
    inputs = _inputs(rng, shape, np.float64, bias=shape[0] != 3)
    expected, expected_grads = _run(registry.get("conv3x3").reference, inputs)
    out, grads = _run(_impl("conv3x3", "winograd4"), inputs)
    assert np.isfinite(out).all()  # every NaN-prefilled output written
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    for name, g, e in zip(("grad_x", "grad_weight", "grad_bias"), grads, expected_grads):
        if e is None:
            assert g is None
            continue
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12 * np.abs(e).max(), err_msg=name)


@pytest.mark.parametrize("shape", [(4, 64, 64, 16, 16), (2, 32, 48, 13, 11), (8, 3, 32, 16, 16)], ids=str)
def test_float32_error_is_bounded(shape, rng):
    x, weight, b = _inputs(rng, shape, np.float32)
    expected, expected_grads = _run(registry.get("conv3x3").reference,
                                    tuple(a.astype(np.float64) for a in (x, weight, b)))
    out, grads = _run(_impl("conv3x3", "winograd4"), (x, weight, b))
    for name, got, want in (("y", out, expected), ("grad_x", grads[0], expected_grads[0]),
                            ("grad_weight", grads[1], expected_grads[1])):
        assert got.dtype == np.float32
        worst, rms = _relative_errors(got, want)
        assert worst < WINOGRAD4_F32_MAX_BOUND, f"{name}: max error {worst:.2e} of max |{name}|"
        assert rms < WINOGRAD4_F32_RMS_BOUND, f"{name}: relative RMS error {rms:.2e}"
    # grad_bias is the direct kernel's
    _, direct_grads = _run(_impl("conv3x3", "direct"), (x, weight, b))
    np.testing.assert_array_equal(grads[2], direct_grads[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_never_writes_outside_the_output(dtype, rng):
    # y and grad_x are views into larger NaN buffers: the guard elements stay NaN
    n, c, k, h, w = 2, 5, 7, 9, 11
    x, weight, b = _inputs(rng, (n, c, k, h, w), dtype)
    guard = 40
    ybuf = np.full(n * k * h * w + 2 * guard, np.nan, dtype)
    y = ybuf[guard:-guard].reshape(n, k, h, w)
    C.conv3x3_forward(x, weight, b, y, "winograd4")
    gbuf = np.full(n * c * h * w + 2 * guard, np.nan, dtype)
    gx = gbuf[guard:-guard].reshape(n, c, h, w)
    C.conv3x3_grad_x(rng.standard_normal(y.shape).astype(dtype), weight, gx, "winograd4")
    for buf, arr in ((ybuf, y), (gbuf, gx)):
        assert np.isfinite(arr).all()
        assert np.isnan(buf[:guard]).all() and np.isnan(buf[-guard:]).all()


def test_rows_of_more_than_128_tiles(rng):
    # W = 517: 130 tiles per row, computed as two segments of 65
    inputs = _inputs(rng, (1, 3, 4, 6, 517), np.float64)
    expected, expected_grads = _run(registry.get("conv3x3").reference, inputs)
    out, grads = _run(_impl("conv3x3", "winograd4"), inputs)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    np.testing.assert_allclose(grads[0], expected_grads[0], rtol=1e-10, atol=1e-12 * np.abs(expected_grads[0]).max())


def test_grad_x_matches_finite_differences(rng):
    # d/dx of sum(g * conv(x)) by central differences of the winograd4 forward itself (float64)
    impl = _impl("conv3x3", "winograd4")
    x, weight, b = _inputs(rng, (2, 3, 4, 5, 6), np.float64)
    g = rng.standard_normal((2, 4, 5, 6))
    ctx = Context((True, False, False))
    impl.forward(ctx, x, weight, b)
    grad_x = impl.backward(ctx, g)[0]

    def objective(xv):
        return float((g * impl.forward(Context((False,) * 3), xv, weight, b)).sum())

    numeric = np.zeros_like(x)
    eps = 1e-6
    for index in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += eps
        minus[index] -= eps
        numeric[index] = (objective(plus) - objective(minus)) / (2 * eps)
    np.testing.assert_allclose(grad_x, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 20, 13, 17, 15), (3, 24, 30, 17, 15), (20, 64, 64, 32, 32)],
                         ids=str)  # 20 x 64 x 32 x 32: several blocks and slices
def test_result_does_not_depend_on_the_thread_count(shape, rng):
    n, c, k, h, w = shape
    x, weight, b = _inputs(rng, shape, np.float32)
    g = rng.standard_normal((n, k, h, w)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        with omp_threads(threads):
            y = np.empty((n, k, h, w), np.float32)
            gx, gw = np.empty_like(x), np.empty_like(weight)
            C.conv3x3_forward(x, weight, b, y, "winograd4")
            C.conv3x3_grad_x(g, weight, gx, "winograd4")
            C.conv3x3_grad_weight(x, g, gw, None, "winograd4")
            results.append((y, gx, gw))
    for got in results[1:]:
        for a, want in zip(got, results[0]):
            np.testing.assert_array_equal(a, want)


# grad_weight by Winograd: odd sizes, K not a multiple of the GEMM's 6 rows nor C of 16 lanes,
# 1x1 and 2-pixel images, W of more than 16 pixels per transposition, a batch of many blocks
# and slices (20 x 64 x 32 x 32: blocks of 4 tile rows, 16 slices), one image of many tile
# rows, channels past 16 for the AVX-512 transposes
GRAD_WEIGHT_SHAPES = [(3, 24, 25, 7, 9), (2, 30, 7, 5, 13), (4, 1, 31, 1, 1), (1, 17, 24, 4, 4),
                      (2, 37, 29, 3, 2), (20, 64, 64, 32, 32), (1, 5, 3, 41, 37), (3, 2, 40, 6, 18)]


@pytest.mark.parametrize("shape", GRAD_WEIGHT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_weight_by_winograd(shape, dtype, rng):
    x, weight, _ = _inputs(rng, shape, dtype)
    n, _, k, h, w = shape
    g = rng.standard_normal((n, k, h, w)).astype(dtype)
    gw = np.full_like(weight, np.nan)
    C.conv3x3_grad_weight(x, g, gw, None, "winograd4")
    want = np.full(weight.shape, np.nan)  # float64, direct
    C.conv3x3_grad_weight(x.astype(np.float64), g.astype(np.float64), want, None, "direct")
    worst, _ = _relative_errors(gw, want)
    assert worst < (1e-12 if dtype == np.float64 else WINOGRAD4_F32_MAX_BOUND)


def test_bindings_name_the_new_algorithm(rng):
    x, weight, b = _inputs(rng, (1, 2, 3, 4, 4), np.float32)
    y = np.empty((1, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="winograd4"):
        C.conv3x3_forward(x, weight, b, y, "winograd5")


# ------------------------------------------------------------------------- conv3x3_act

ACTIVATIONS = [("relu", {}), ("leaky_relu", {"slope": 0.1}), ("leaky_relu", {"slope": -0.3}), ("prelu", {}),
               ("elu", {"alpha": 1.0}), ("swish", {})]


@pytest.mark.parametrize("activation,params", ACTIVATIONS, ids=[f"{a}{p}" for a, p in ACTIVATIONS])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv3x3_act_matches_the_composition(activation, params, dtype, rng):
    if activation not in conv.CONV_ACTIVATIONS:
        pytest.skip(f"{activation} is not a conv3x3_act activation here")
    impl = _impl("conv3x3_act", "winograd4")
    x, weight, b = _inputs(rng, (2, 12, 9, 11, 7), dtype)
    pw = rng.uniform(-0.3, 0.5, 9).astype(dtype) if activation == "prelu" else None
    params = dict(params, activation=activation)
    inputs = (x, weight, b, pw)
    ref = registry.get("conv3x3_act").reference
    expected, expected_grads = _run(ref, tuple(None if a is None else a.astype(np.float64) for a in inputs), params)
    out, grads = _run(impl, inputs, params)
    assert out.dtype == dtype
    if dtype == np.float64:
        tol = dict(rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    else:  # y = act(z): the error of z (WINOGRAD4_F32_MAX_BOUND of max |z|), at most as large
        tol = dict(rtol=1e-4, atol=WINOGRAD4_F32_MAX_BOUND * np.abs(expected).max())
    np.testing.assert_allclose(out, expected, **tol, err_msg="y")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        if e is None:
            assert g is None
            continue
        scale = np.abs(e).max()
        gtol = dict(rtol=1e-10, atol=1e-12 * scale) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(g, e, **gtol, err_msg=f"gradient {i}")


def test_conv3x3_act_epilogue_sees_the_winograd4_output(rng):
    # y = relu(z) and the kept pre-activation z are the plain winograd4 output, bit for bit
    x, weight, b = _inputs(rng, (2, 6, 10, 9, 13), np.float32)
    z = np.empty((2, 10, 9, 13), np.float32)
    C.conv3x3_forward(x, weight, b, z, "winograd4")
    y = np.full_like(z, np.nan)
    pre = np.full_like(z, np.nan)
    C.conv3x3_act_forward(x, weight, b, None, y, pre, "leaky_relu", 0.1, 1.0, "winograd4")
    np.testing.assert_array_equal(pre, z)
    np.testing.assert_array_equal(y, np.where(z > 0, z, z * np.float32(0.1)))


# ---------------------------------------------------------------------------- auto rule

@pytest.mark.parametrize("c,k,h,w,algo", [
    # the README net: its first layer stays direct
    (3, 32, 32, 32, "direct"), (32, 32, 32, 32, "winograd4"), (32, 64, 16, 16, "winograd4"),
    (64, 64, 16, 16, "winograd4"), (64, 128, 8, 8, "winograd4"), (128, 128, 8, 8, "winograd4"),
    (16, 16, 32, 32, "winograd4"), (16, 32, 16, 16, "winograd4"), (8, 16, 32, 32, "winograd4"),
    # fewer channels, small images, more than 256 channels: F(2x2, 3x3) or direct
    (4, 16, 32, 32, "direct"), (64, 64, 6, 6, "winograd"), (64, 64, 4, 4, "winograd"),
    (128, 128, 2, 2, "winograd"), (256, 256, 8, 8, "winograd4"), (128, 256, 16, 16, "winograd4"),
    (512, 512, 8, 8, "winograd"),
    (16, 16, 4, 4, "direct")])
def test_auto_picks_winograd4_where_it_was_measured_faster(c, k, h, w, algo):
    shapes = ((64, c, h, w), (k, c, 3, 3), (k,))
    assert cpp_backend.choose_conv3x3_algo(shapes, {}) == algo
