"""Focused tests of csrc/maps.cpp (sigmoid, tanh, maxout, dropout) and csrc/fancy_pca.cpp
(the fancy PCA op and the RGB moments of augment.FancyPCA.fit).  The generic comparison of
every cpp implementation with its NumPy reference is registry-driven (test_ops.py)."""
from __future__ import annotations

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")

import pycnn  # noqa: E402
from pycnn.autograd import Context  # noqa: E402
from pycnn.data import augment as A  # noqa: E402
from pycnn.ops import _util, registry  # noqa: E402
from tests.conftest import TOLERANCE, omp_threads  # noqa: E402

DTYPES = [np.float32, np.float64]




def cpp(name):
    op = registry.get(name)
    assert "default" in op.algorithms("cpp"), f"{name} has no cpp implementation"  # loads the backend
    return op.impls[("cpp", "default")]


def run(impl, x, grad=None, **params):
    """(y, grad_x) of one implementation, outputs NaN-filled."""
    ctx = Context((True,))
    with _util.nan_filled_outputs():
        y = np.array(impl.forward(ctx, x, **params), copy=True)
        gx = None if grad is None else impl.backward(ctx, grad)[0]
    return y, gx


# ---------------------------------------------------------------------- sigmoid and tanh

@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_and_tanh_are_finite_and_saturate_at_large_inputs(dtype):
    x = np.array([-1e30, -1000.0, -100.0, -30.0, 0.0, 30.0, 100.0, 1000.0, 1e30], dtype=dtype)
    with np.errstate(all="raise"):  # the kernel never overflows (and NumPy is not asked to)
        y, gx = run(cpp("sigmoid"), x, np.ones_like(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(gx))
    assert y[0] == 0 and y[-1] == 1 and y[4] == 0.5
    np.testing.assert_allclose(y[3], 1 / (1 + np.exp(30.0)), rtol=1e-5)  # e^-30: relative, not absolute, accuracy
    t, _ = run(cpp("tanh"), x)
    np.testing.assert_array_equal(t[[0, 1, 2]], -1)
    np.testing.assert_array_equal(t[[-3, -2, -1]], 1)
    nan, _ = run(cpp("sigmoid"), np.array([np.nan, np.inf, -np.inf], dtype=dtype))
    assert np.isnan(nan[0]) and nan[1] == 1 and nan[2] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sigmoid_tanh_match_numpy_over_a_wide_range(name, dtype):
    x = np.concatenate([np.linspace(-60, 60, 100_001), np.geomspace(1e-12, 40, 5000),
                        -np.geomspace(1e-12, 40, 5000)]).astype(dtype)
    y, gx = run(cpp(name), x, np.ones_like(x))
    ref = registry.get(name).reference
    ctx = Context((True,))
    expected = ref.forward(ctx, x)
    np.testing.assert_allclose(y, expected, **TOLERANCE[np.dtype(dtype)])
    np.testing.assert_allclose(gx, ref.backward(ctx, np.ones_like(x))[0], **TOLERANCE[np.dtype(dtype)])
    if name == "tanh":  # small |x|: relative accuracy (expm1, no cancellation)
        small = np.abs(x) < 1e-3
        np.testing.assert_allclose(y[small], np.tanh(x[small]), rtol=4 * np.finfo(dtype).eps)


# --------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 3, 2**63 + 5])
def test_dropout_mask_is_the_numpy_mask_on_any_thread_count(dtype, p, seed):
    x = np.random.default_rng(0).uniform(1, 2, (4, 8, 33, 31)).astype(dtype)  # no zeros of its own
    g = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    ref = registry.get("dropout").reference
    ctx = Context((True,))
    expected = ref.forward(ctx, x, p=p, seed=seed)
    expected_gx = ref.backward(ctx, g)[0]
    for threads in (1, 2, 3):
        with omp_threads(threads):
            y, gx = run(cpp("dropout"), x, g, p=p, seed=seed)
        np.testing.assert_array_equal(y != 0, expected != 0)  # the same kept elements, bit for bit
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(gx, expected_gx)


def test_dropout_evaluation_is_the_identity_and_checks_p():
    x = np.ones((3, 4), np.float32)
    ctx = Context((True,))
    assert cpp("dropout").forward(ctx, x, p=0.5, training=False) is x
    with pytest.raises(ValueError, match="dropout_forward: p must be a probability"):
        C.dropout_forward(x, np.empty_like(x), 1.5, 0)


# ---------------------------------------------------------------------------------- maxout

@pytest.mark.parametrize("dtype", DTYPES)
def test_maxout_ties_go_to_the_first_and_nan_wins(dtype):
    # each row is one group of 4 channels: ties, a NaN after a larger number, a NaN first, two NaNs
    rows = np.array([[1.0, 1.0, 0.5, 1.0], [0.0, 3.0, np.nan, 3.0], [np.nan, 5.0, 5.0, 1.0],
                     [2.0, np.nan, np.nan, 2.0], [-1.0, -2.0, -1.0, -1.0], [-np.inf, -np.inf, -np.inf, -np.inf]])
    x = rows.astype(dtype).reshape(1, 24, 1)   # (N, C*k, S) with k = 4
    grad = np.arange(1.0, 7.0, dtype=dtype).reshape(1, 6, 1)
    ref = registry.get("maxout").reference
    ctx = Context((True,))
    expected = ref.forward(ctx, x, pieces=4)
    expected_gx = ref.backward(ctx, grad)[0]
    y, gx = run(cpp("maxout"), x, grad, pieces=4)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(gx, expected_gx)
    winners = np.argmax(gx.reshape(6, 4) != 0, axis=1)
    np.testing.assert_array_equal(winners, [0, 2, 0, 1, 0, 0])


@pytest.mark.parametrize("shape,pieces", [((4, 6, 33, 17), 2), ((3, 12, 5), 3), ((5, 8), 8), ((2, 512, 3), 256),
                                          ((2, 6, 40, 40), 1)])
def test_maxout_matches_the_reference_on_any_thread_count(shape, pieces):
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 3, shape).astype(np.float32)  # many ties
    ref = registry.get("maxout").reference
    ctx = Context((True,))
    expected = ref.forward(ctx, x, pieces=pieces)
    grad = rng.standard_normal(expected.shape).astype(np.float32)
    expected_gx = ref.backward(ctx, grad)[0]
    for threads in (1, 2):
        with omp_threads(threads):
            y, gx = run(cpp("maxout"), x, grad, pieces=pieces)
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(gx, expected_gx)


def test_maxout_more_than_256_pieces_is_refused():
    """The router then runs the reference (auto) or raises (forced): tests/test_backend.py."""
    x = np.random.default_rng(5).standard_normal((2, 300, 2))
    assert "256 pieces" in cpp("maxout").refuses((x,), {"pieces": 300})
    assert cpp("maxout").refuses((x,), {"pieces": 256}) is None


def test_maxout_kernel_checks_its_arguments():
    x = np.zeros((2, 6, 3), np.float32)
    y, w = np.empty((2, 3, 3), np.float32), np.empty((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="maxout_forward: y must have shape \\(2, 3, 3\\)"):
        C.maxout_forward(x, np.empty((2, 2, 3), np.float32), w, 2)
    with pytest.raises(TypeError, match="maxout_forward: winner must be uint8"):
        C.maxout_forward(x, y, w.astype(np.int32), 2)
    with pytest.raises(ValueError, match="maxout_forward: x must have a channel count divisible"):
        C.maxout_forward(x, y, w, 4)
    with pytest.raises(ValueError, match="pieces must be in \\[1, 256\\]"):
        C.maxout_forward(x, y, w, 300)
    with pytest.raises(ValueError, match="maxout_backward: grad_y must have shape"):
        C.maxout_backward(np.zeros((2, 2, 3), np.float32), w, x, 2)


# ------------------------------------------------------------------------------- fancy PCA

def _pca_params(n, rng):
    eigvals, eigvecs = np.linalg.eigh(np.cov(rng.uniform(0, 1, (3, 50))))
    return {"eigvecs": eigvecs, "eigvals": eigvals, "alphas": rng.normal(0, 0.1, (n, 3))}


@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (64, 3, 32, 32)])
def test_fancy_pca_uint8_images_give_float32_on_the_0_255_scale(shape):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    params = _pca_params(shape[0], rng)
    y, _ = run(cpp("fancy_pca"), images, **params)
    assert y.dtype == np.float32
    delta = ((params["alphas"] * params["eigvals"]) @ params["eigvecs"].T) * 255.0  # (N, 3)
    np.testing.assert_allclose(y, images + delta[:, :, None, None], rtol=1e-6, atol=1e-4)
    ctx = Context((True,))
    expected = registry.get("fancy_pca").reference.forward(ctx, images, **params)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-5)
    # uint8 images are not differentiable
    ctx = Context((True,))
    cpp("fancy_pca").forward(ctx, images, **params)
    assert cpp("fancy_pca").backward(ctx, np.ones(shape, np.float32)) == (None,)
    # an explicit scale
    y1, _ = run(cpp("fancy_pca"), images, **params, scale=1.0)
    np.testing.assert_allclose(y1, images + delta[:, :, None, None] / 255.0, rtol=1e-6, atol=1e-5)


def test_fancy_pca_kernel_checks_its_arguments():
    images = np.zeros((2, 3, 4, 4), np.uint8)
    eye, ones, alphas = np.eye(3), np.ones(3), np.zeros((2, 3))
    out = np.empty(images.shape, np.float32)
    with pytest.raises(TypeError, match="fancy_pca_apply: out must be float32 for uint8 images"):
        C.fancy_pca_apply(images, eye, ones, alphas, 255.0, out.astype(np.float64))
    with pytest.raises(ValueError, match="fancy_pca_apply: alphas must have shape \\(N, 3\\) = \\(2, 3\\)"):
        C.fancy_pca_apply(images, eye, ones, np.zeros((3, 3)), 255.0, out)
    with pytest.raises(ValueError, match="fancy_pca_apply: images must be RGB"):
        C.fancy_pca_apply(np.zeros((2, 1, 4, 4), np.uint8), eye, ones, alphas, 255.0, out)
    with pytest.raises(TypeError, match="images must be uint8, float32 or float64"):
        registry.get("fancy_pca").check(images.astype(np.int16), eigvecs=eye, eigvals=ones, alphas=alphas)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_rgb_moments_match_numpy_on_any_thread_count(dtype):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (7, 3, 190, 180)).astype(dtype)  # 34200 pixels: two chunks per image
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    for threads in (1, 2):
        sums, outer = np.ones(3), np.ones((3, 3))  # accumulated into
        with omp_threads(threads):
            count = C.rgb_moments(images, sums, outer)
        assert count == 7 * 190 * 180
        np.testing.assert_array_equal(sums, pixels.sum(axis=1) + 1)  # integers: exact in any order
        np.testing.assert_array_equal(outer, pixels @ pixels.T + 1)


def test_fancy_pca_fit_gives_the_same_decomposition_with_and_without_the_kernel(monkeypatch):
    images = np.random.default_rng(8).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    images[:, 0] //= 2  # correlated, unequal channels
    with_kernel = A.FancyPCA().fit(images, batch=9)
    monkeypatch.setattr(A, "_rgb_moments_kernel", lambda: None)
    numpy_only = A.FancyPCA().fit(images, batch=9)
    np.testing.assert_array_equal(with_kernel.cov, numpy_only.cov)
    np.testing.assert_allclose(with_kernel.eigvals, numpy_only.eigvals, rtol=1e-10)
    np.testing.assert_allclose(np.abs(with_kernel.eigvecs), np.abs(numpy_only.eigvecs), atol=1e-10)
    assert with_kernel.count == numpy_only.count == 40 * 256


def test_augment_fancy_pca_runs_the_registry_op():
    images = np.random.default_rng(9).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    pca = A.FancyPCA().fit(images)
    with pycnn.profile() as prof:
        out = pca(images, 3)
    assert ("fancy_pca", "cpp", "default", "forward") in prof.calls
    with pycnn.use_backend("numpy"):
        expected = pca(images, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)
    half = pca(images.astype(np.float16) / np.float16(255), 3)  # float16 works in float32
    assert half.dtype == np.float32
    np.testing.assert_allclose(half * 255, out, atol=0.2)
