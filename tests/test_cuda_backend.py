"""The cuda backend (Numba-CUDA kernels in kernels/) against the NumPy references.

Runs in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: kernels run as Python on NumPy
arrays, ~10k threads/s, so shapes are tiny) or on a real GPU with CuPy; skips otherwise.

    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. pytest tests/test_cuda_backend.py

Markers: ``gpu`` (needs a real GPU and CuPy), ``slow`` (skipped in the simulator).
``test_kernels_compile_to_ptx`` needs neither: it compiles every kernel launch to sm_90 PTX
with NVVM (``pip install 'numba-cuda[cu13]'``) and checks float32 kernels stay in float32.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn.autograd import Context
from pycnn.ops import _util, registry, routing

SIMULATED = routing.cuda_simulated()
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba") is not None and importlib.util.find_spec("numba.cuda") is not None


def _real_gpu_reason() -> str | None:
    """None when a CUDA GPU and CuPy are usable, else why not."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # ImportError, or a CUDA driver error
        return f"no usable CuPy/GPU ({type(exc).__name__}: {exc})"
    return None


if not HAVE_NUMBA_CUDA:
    _SKIP_REASON = "numba-cuda is not installed (pip install numba-cuda)"
elif SIMULATED:
    _SKIP_REASON = None
else:
    _why = _real_gpu_reason()
    _SKIP_REASON = None if _why is None else f"needs NUMBA_ENABLE_CUDASIM=1 or a real GPU with CuPy: {_why}"

# small test shapes make numba warn about GPU under-utilisation on a real device
pytestmark = pytest.mark.filterwarnings("ignore:Grid size")

needs_cuda = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")
real_gpu_only = pytest.mark.skipif(SIMULATED or _SKIP_REASON is not None,
                                   reason="needs a real GPU with CuPy (not the simulator)")

# the ops with kernels: every op that is not portable (portable ones run their reference on CuPy)
CUDA_OPS = tuple(op.name for op in registry.all_ops() if not op.portable)
DTYPES = (np.float32, np.float64)
TOL = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10)}


# ------------------------------------------------------------------------------ helpers

def to_device(a):
    """Host array -> the array the cuda backend runs on (NumPy in the simulator, else CuPy)."""
    if a is None or SIMULATED or not isinstance(a, np.ndarray):
        return a
    import cupy
    return cupy.asarray(a)


def to_host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    import cupy
    return cupy.asnumpy(a)


def cuda_backend():
    from pycnn.ops import cuda_backend as module
    registry._load_backend("cuda")
    return module


def kernel_module(name):
    return cuda_backend().kernel_module(name)


def run_op(impl, sample_inputs, params, grad, needs=None):
    """forward then backward of ``impl`` with NaN-filled outputs; results on the host."""
    needs = tuple(x is not None for x in sample_inputs) if needs is None else needs
    ctx = Context(needs)
    with _util.nan_filled_outputs():
        y = impl.forward(ctx, *sample_inputs, **params)
        grads = impl.backward(ctx, grad)
    return to_host(y), tuple(to_host(g) for g in grads)


def check_against_reference(op, sample, dtype, rng, needs=None, algo=None):
    """Forward and backward of the cuda implementation vs the reference, outputs NaN-filled."""
    # the reference on the host
    ctx = Context(tuple(x is not None for x in sample.inputs) if needs is None else needs)
    ref_y = op.reference.forward(ctx, *sample.inputs, **sample.params)
    grad = rng.standard_normal(ref_y.shape).astype(dtype)
    ref_grads = op.reference.backward(ctx, grad.copy())
    # the cuda implementation on the device
    inputs = tuple(to_device(x) for x in sample.inputs)
    params = {key: to_device(value) for key, value in sample.params.items()}  # e.g. running statistics
    with pycnn.use_backend("cuda"):
        backend, chosen, impl = op.resolve(inputs, params, algo or "auto")
    assert backend == "cuda", f"{op.name} resolved to {backend}"
    y, grads = run_op(impl, inputs, params, to_device(grad), needs)
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(y, ref_y, err_msg=f"{op.name} forward", **tol)
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None or (needs is not None and not needs[i]):
            assert g is None, f"{op.name}: gradient {i} should be None"
            continue
        assert g is not None, f"{op.name}: gradient {i} is missing"
        assert g.dtype == np.dtype(dtype), f"{op.name}: gradient {i} is {g.dtype}"
        np.testing.assert_allclose(g, r, err_msg=f"{op.name} gradient {i}", **tol)


# -------------------------------------------------------------------------- registration

@needs_cuda
def test_cuda_backend_registers_every_kernel_op():
    cuda_backend()
    for name in CUDA_OPS:
        algorithms = registry.get(name).algorithms("cuda")
        assert algorithms and "reference" not in algorithms, f"{name} has no cuda kernel"
    own_kernel = {"softmax_cross_entropy": ["kernel", "reference"]}  # portable ops with a kernel too
    for op in registry.all_ops():
        if op.portable:
            assert op.algorithms("cuda") == own_kernel.get(op.name, ["reference"]), op.name
    assert registry.get("conv3x3").algorithms("cuda") == ["gemm", "direct", "igemm", "igemm_tf32"]
    assert registry.get("conv3x3_act").algorithms("cuda") == ["gemm", "igemm", "igemm_tf32"]
    assert registry.get("batchnorm_act").algorithms("cuda") == ["fused", "chain"]


def test_importing_pycnn_does_not_import_numba():
    code = "import sys, pycnn; import pycnn.functional; assert 'numba' not in sys.modules, 'numba imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(pycnn.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------- ops vs the reference

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", CUDA_OPS)
def test_op_matches_reference(name, dtype):
    op = registry.get(name)
    rng = np.random.default_rng(1234)
    for sample in op.samples(rng, np.dtype(dtype)):
        check_against_reference(op, sample, dtype, rng)


@needs_cuda
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_conv3x3_returns_only_the_gradients_asked_for(needs):
    op = registry.get("conv3x3")
    rng = np.random.default_rng(5)
    sample = op.samples(rng, np.dtype(np.float32))[0]
    check_against_reference(op, sample, np.float32, rng, needs=needs, algo="direct")


@needs_cuda
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_prelu_returns_only_the_gradients_asked_for(needs):
    op = registry.get("prelu")
    rng = np.random.default_rng(6)
    check_against_reference(op, op.samples(rng, np.dtype(np.float64))[0], np.float64, rng, needs=needs)


def _check_conv_tiles(shape, rng):
    n, c, k, h, w = shape
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((k, c, 3, 3)) / 4
    bias = rng.standard_normal(k)
    check_against_reference(registry.get("conv3x3"), registry.Sample((x, weight, bias)), np.float64, rng)


@needs_cuda
def test_conv3x3_several_tiles_and_channel_blocks(monkeypatch):
    """Images covered by several tiles in both directions (odd sizes: partial tiles) and
    K > KB output channels (a partial channel block).  4x4 tiles keep the simulator fast;
    a small per-thread share forces several blocks per weight-gradient entry, so their
    atomic accumulation is checked too."""
    conv = kernel_module("conv3x3")
    monkeypatch.setattr(conv, "tile_for", lambda h, w: 4)
    monkeypatch.setattr(kernel_module("reduce"), "ELEMENTS_PER_THREAD", 2)
    _check_conv_tiles((1, 1, conv.KB + 1, 6, 9), np.random.default_rng(7))


@pytest.mark.slow
@pytest.mark.skipif(SIMULATED or _SKIP_REASON is not None, reason="too slow for the CUDA simulator")
def test_conv3x3_several_16x16_tiles():
    _check_conv_tiles((2, 3, 17, 35, 19), np.random.default_rng(15))


@needs_cuda
def test_reductions_with_several_blocks_per_channel(monkeypatch):
    """prelu's slope gradient and conv's bias gradient: block tree sums + atomics across blocks."""
    monkeypatch.setattr(kernel_module("reduce"), "ELEMENTS_PER_THREAD", 1)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 2, 5, 7))
    check_against_reference(registry.get("prelu"), registry.Sample((x, np.array([0.1, -0.3]))), np.float64, rng)
    grad = to_device(rng.standard_normal((3, 2, 5, 7)))
    out = to_device(np.full(2, np.nan))
    kernel_module("conv3x3").conv3x3_grad_bias(grad, out)
    np.testing.assert_allclose(to_host(out), to_host(grad).sum(axis=(0, 2, 3)), rtol=1e-12)


# ---------------------------------------------------------------------- rules, bit for bit

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("seed", [0, 7, 2 ** 63 + 5, 2 ** 64 - 1])
def test_rng_device_function_is_bit_equal_to_util_uniform(seed, dtype):
    out = to_device(np.full(37, np.nan, dtype=dtype))
    kernel_module("rng").uniform(seed, out)
    np.testing.assert_array_equal(to_host(out), _util.uniform(seed, 37, np.dtype(dtype)))


@needs_cuda
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_dropout_keeps_exactly_the_reference_elements(p):
    x = np.random.default_rng(9).uniform(1, 2, (3, 29)).astype(np.float32)  # no zeros of its own
    ref = registry.get("dropout").reference.forward(Context((True,)), x, p=p, seed=42)
    with pycnn.use_backend("cuda"):
        y = F.dropout(pycnn.Tensor(to_device(x)), p=p, seed=42).numpy()
    np.testing.assert_array_equal(y != 0, ref != 0)
    np.testing.assert_allclose(y, ref, rtol=1e-6)


@needs_cuda
@pytest.mark.parametrize("name", ["max_pool2x2", "maxout"])
def test_max_ties_go_to_the_first_and_nan_wins(name):
    # windows / groups: ties, a NaN after a larger number, a NaN first, two NaNs
    rows = np.array([[1.0, 1.0, 0.5, 1.0], [0.0, 3.0, np.nan, 3.0], [np.nan, 5.0, 5.0, 1.0],
                     [2.0, np.nan, np.nan, 2.0], [-1.0, -2.0, -1.0, -1.0]])
    if name == "max_pool2x2":  # each row is one 2x2 window (row-major), windows side by side
        x = rows.reshape(1, 5, 2, 2)
    else:  # each row is one group of 4 channels
        x = rows.reshape(1, 20)
    op = registry.get(name)
    params = {} if name == "max_pool2x2" else {"pieces": 4}
    ctx = Context((True,))
    ref = op.reference.forward(ctx, x, **params)
    grad = np.arange(1.0, ref.size + 1).reshape(ref.shape)
    ref_gx = op.reference.backward(ctx, grad)[0]
    with pycnn.use_backend("cuda"):
        _, _, impl = op.resolve((to_device(x),), params)
    y, (gx,) = run_op(impl, (to_device(x),), params, to_device(grad))
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(gx, ref_gx)


# ------------------------------------------------------------------------------ fancy PCA

def _fancy_pca_reference(images, eigvecs, eigvals, alphas):
    delta = (eigvecs @ (alphas * eigvals).T).T  # (N, 3): sum_i p_i * alpha_i * lambda_i
    return images + delta[:, :, None, None]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fancy_pca_apply(dtype):
    fancy_pca = kernel_module("fancy_pca")
    rng = np.random.default_rng(10)
    images = rng.uniform(0, 1, (3, 3, 4, 5)).astype(dtype)
    eigvals, eigvecs = np.linalg.eigh(np.cov(rng.standard_normal((3, 50))))
    alphas = rng.normal(0, 0.1, (3, 3))
    with _util.nan_filled_outputs():
        out = fancy_pca.fancy_pca_apply(to_device(images), to_device(eigvecs), to_device(eigvals),
                                        to_device(alphas))
    expected = _fancy_pca_reference(images.astype(np.float64), eigvecs, eigvals, alphas)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(to_host(out), expected, **TOL[np.dtype(dtype)])
    # in place
    inplace = to_device(images.copy())
    fancy_pca.fancy_pca_apply(inplace, to_device(eigvecs), to_device(eigvals), to_device(alphas), out=inplace)
    np.testing.assert_allclose(to_host(inplace), to_host(out), rtol=0, atol=0)


@needs_cuda
def test_fancy_pca_op_on_uint8_images():
    """The registry op on uint8 images: float32 on the 0..255 scale, no gradient."""
    op = registry.get("fancy_pca")
    rng = np.random.default_rng(16)
    images = rng.integers(0, 256, (2, 3, 3, 4), dtype=np.uint8)
    eigvals, eigvecs = np.linalg.eigh(np.cov(rng.uniform(0, 1, (3, 50))))
    params = {"eigvecs": eigvecs, "eigvals": eigvals, "alphas": rng.normal(0, 0.1, (2, 3))}
    expected = op.reference.forward(Context((False,)), images, **params)
    with pycnn.use_backend("cuda"):
        backend, _, impl = op.resolve((to_device(images),), params)
    assert backend == "cuda"
    ctx = Context((False,))
    with _util.nan_filled_outputs():
        y = to_host(impl.forward(ctx, to_device(images), **params))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-4)
    assert impl.backward(ctx, to_device(np.ones(images.shape, np.float32))) == (None,)


@needs_cuda
def test_fancy_pca_checks_its_arguments():
    fancy_pca = kernel_module("fancy_pca")
    images = to_device(np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        fancy_pca.fancy_pca_apply(to_device(np.zeros((2, 1, 2, 2), np.float32)), np.eye(3), np.ones(3),
                                  np.zeros((2, 3)))
    with pytest.raises(ValueError, match="alphas"):
        fancy_pca.fancy_pca_apply(images, np.eye(3), np.ones(3), np.zeros((3, 3)))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rgb_moments_and_pca(dtype, monkeypatch):
    fancy_pca = kernel_module("fancy_pca")
    monkeypatch.setattr(kernel_module("reduce"), "ELEMENTS_PER_THREAD", 1)  # several blocks
    rng = np.random.default_rng(11)
    images = rng.uniform(0, 1, (2, 3, 5, 7)).astype(dtype)
    count, sums, outer = fancy_pca.rgb_moments(to_device(images))
    pixels = images.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 3)  # (N*H*W, 3)
    assert count == pixels.shape[0]
    np.testing.assert_allclose(to_host(sums), pixels.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(to_host(outer), pixels.T @ pixels, rtol=1e-12)
    eigvals, eigvecs = fancy_pca.pca_from_moments(count, sums, outer)
    expected_vals = np.linalg.eigvalsh(np.cov(pixels.T))  # unbiased, as augment.FancyPCA.fit
    np.testing.assert_allclose(to_host(eigvals), expected_vals, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ a network that learns

def _train_small_network(backend, steps=4):
    """conv3x3 -> relu -> maxpool -> flatten -> linear -> softmax cross-entropy, plain SGD on
    8 images of 1x6x6 in 2 classes (bright left half vs bright right half); the losses."""
    rng = np.random.default_rng(12)
    labels = np.array([0, 1] * 4)
    images = rng.normal(0, 0.1, (8, 1, 6, 6)).astype(np.float32)
    images[labels == 0, :, :, :3] += 1.0
    images[labels == 1, :, :, 3:] += 1.0
    x = pycnn.Tensor(to_device(images))
    y = to_device(labels)
    w1 = pycnn.Tensor(to_device((rng.standard_normal((2, 1, 3, 3)) / 3).astype(np.float32)), requires_grad=True)
    b1 = pycnn.Tensor(to_device(np.zeros(2, np.float32)), requires_grad=True)
    w2 = pycnn.Tensor(to_device((rng.standard_normal((2, 18)) / 4).astype(np.float32)), requires_grad=True)
    b2 = pycnn.Tensor(to_device(np.zeros(2, np.float32)), requires_grad=True)
    params = [w1, b1, w2, b2]
    losses = []
    with pycnn.use_backend(backend):
        for _ in range(steps):
            h = F.max_pool2x2(F.relu(F.conv3x3(x, w1, b1)))          # (8, 2, 3, 3)
            loss = F.softmax_cross_entropy(F.linear(F.flatten(h), w2, b2), y)
            loss.backward()
            losses.append(loss.item())
            for p in params:  # plain SGD on the arrays
                p.data -= 0.5 * p.grad
                p.grad = None
    return losses


@needs_cuda
def test_small_network_trains_on_the_cuda_backend(monkeypatch):
    cb = cuda_backend()
    calls = []
    for kernel in ("im2col", "col2im"):  # conv3x3's default algorithm on cuda: im2col + GEMM
        gemm = cb.kernel_module("conv_gemm")
        original = getattr(gemm, kernel)
        monkeypatch.setattr(gemm, kernel, lambda *a, _f=original, _n=kernel: (calls.append(_n), _f(*a))[1])
    losses = _train_small_network("cuda")
    assert calls.count("im2col") == 4 and "col2im" not in calls  # x needs no gradient
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    # the same steps on the NumPy references
    np.testing.assert_allclose(losses, _train_small_network("numpy"), rtol=1e-4)


# ---------------------------------------------------------------------------- real GPU

@pytest.mark.gpu
@real_gpu_only
def test_gpu_runs_on_the_current_cupy_stream_and_on_torch_tensors():
    import cupy
    op = registry.get("conv3x3")
    rng = np.random.default_rng(13)
    sample = op.samples(rng, np.dtype(np.float32))[0]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        check_against_reference(op, sample, np.float32, rng)
    stream.synchronize()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA")
    t = torch.randn(2, 3, 8, 8, device="cuda")
    with pycnn.use_backend("cuda"):
        y = F.relu(pycnn.Tensor(cupy.asarray(t)))
    np.testing.assert_allclose(cupy.asnumpy(y.data), np.maximum(t.cpu().numpy(), 0))


@pytest.mark.gpu
@real_gpu_only
@pytest.mark.parametrize("shape", [(8, 16, 32, 32, 32), (2, 3, 19, 61, 45), (4, 64, 64, 8, 8)])
def test_gpu_conv3x3_realistic_shapes(shape):
    n, c, k, h, w = shape
    rng = np.random.default_rng(14)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    op = registry.get("conv3x3")
    # float32 sums of up to N*H*W terms: compare against a float64 reference
    ctx = Context((True, True, True))
    ref = op.reference.forward(ctx, x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64))
    grad = rng.standard_normal(ref.shape)
    ref_grads = op.reference.backward(ctx, grad)
    with pycnn.use_backend("cuda"):
        _, _, impl = op.resolve((to_device(x),), {}, "direct")
    y, grads = run_op(impl, tuple(to_device(a) for a in (x, weight, bias)), {}, to_device(grad.astype(np.float32)))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3 * np.abs(r).max())


@needs_cuda
def test_a_scalar_loss_backpropagates_and_empty_outputs_launch_nothing():
    """A 0-d gradient keeps its shape through the backend's contiguity step (sum().backward()
    on CUDA arrays), and a conv with no output channels (an empty grid: no launch, as CUDA
    refuses one) gives empty outputs and a zero input gradient, for every algorithm."""
    cuda_backend()
    rng = np.random.default_rng(21)
    x_host = rng.standard_normal((2, 3))
    x = pycnn.Tensor(to_device(x_host), requires_grad=True)
    with pycnn.use_backend("cuda"):
        x.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), np.ones((2, 3)))
    for algo in registry.get("conv3x3").algorithms("cuda"):
        x = pycnn.Tensor(to_device(rng.standard_normal((1, 2, 3, 3))), requires_grad=True)
        w = pycnn.Tensor(to_device(np.zeros((0, 2, 3, 3))), requires_grad=True)
        with pycnn.use_backend("cuda"):
            y = F.conv3x3(x, w, algo=algo)
            y.sum().backward()
        assert y.shape == (1, 0, 3, 3), algo
        np.testing.assert_array_equal(to_host(x.grad), np.zeros((1, 2, 3, 3)), err_msg=algo)
        assert to_host(w.grad).shape == (0, 2, 3, 3)


@needs_cuda
def test_fused_relu_keeps_nan_like_the_reference():
    """conv3x3_act (every algorithm) and batchnorm_act with relu turned a NaN pre-activation
    into 0 (a whole network then trained on as if the NaN were not there); max(NaN, 0) is NaN
    in the reference and the cpp backend."""
    cuda_backend()
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = np.nan
    w = np.zeros((1, 1, 3, 3))
    w[0, 0, 1, 1] = 1.0
    for algo in registry.get("conv3x3_act").algorithms("cuda"):
        with pycnn.use_backend("cuda"):
            y = F.conv3x3_act(pycnn.Tensor(to_device(x)), pycnn.Tensor(to_device(w)), activation="relu", algo=algo)
        assert np.isnan(to_host(y.data)).all(), algo  # every output reads the NaN (times a 0 weight)
    xb = np.array([[np.nan, 1.0], [0.5, 2.0], [1.5, -1.0]])
    for training in (True, False):
        with pycnn.use_backend("cuda"):
            y = F.batch_norm_act(pycnn.Tensor(to_device(xb)), pycnn.Tensor(to_device(np.ones(2))),
                                 pycnn.Tensor(to_device(np.zeros(2))), running_mean=to_device(np.zeros(2)),
                                 running_var=to_device(np.ones(2)), training=training)
        assert np.isnan(to_host(y.data)[0, 0]), training


@needs_cuda
@pytest.mark.skipif(not SIMULATED, reason="only host arrays (the simulator's) can be big-endian")
def test_big_endian_inputs_run_as_native_ones():
    """'>f4' inputs pass the dtype checks; the kernels took them as they were and Numba
    refused the type.  Now they are converted, as the cpp backend does."""
    cuda_backend()
    x = np.array([[-1.0, 2.0]], ">f4")
    with pycnn.use_backend("cuda"):
        y = F.relu(pycnn.Tensor(x))
    np.testing.assert_array_equal(to_host(y.data), [[0.0, 2.0]])
    images = np.arange(16, dtype=">f8").reshape(1, 1, 4, 4)
    with pycnn.use_backend("cuda"):
        pooled = F.max_pool2x2(pycnn.Tensor(images))
    np.testing.assert_array_equal(to_host(pooled.data), [[[[5.0, 7.0], [13.0, 15.0]]]])
