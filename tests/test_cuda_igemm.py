"""conv3x3 as implicit GEMM on CUDA (algo "igemm", kernels/conv_igemm.py): forward,
grad_x and grad_weight against the NumPy reference (outputs NaN-filled), across tile edges
(more than 64 output channels and pixels, a reduction that is not a multiple of 8), with
every fused activation, and grad_weight's split sum over pixels; and its TF32 tensor-core
build (algo "igemm_tf32": the warp products emulated in the simulator, the kernels' fragment
layouts and everything around them as on a GPU).  Runs in Numba's CUDA simulator; the
kernels' registers and spills are checked by tests/test_cuda_ptx.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import pycnn
from pycnn.ops import registry, routing
from tests.test_cuda_backend import check_against_reference, cuda_backend, needs_cuda, to_device, to_host


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_igemm_conv3x3_matches_the_reference(dtype):
    cuda_backend()
    op = registry.get("conv3x3")
    rng = np.random.default_rng(11)
    for sample in op.samples(rng, np.dtype(dtype)):
        check_against_reference(op, sample, dtype, rng, algo="igemm")


@needs_cuda
@pytest.mark.parametrize("activation, params", [("relu", {}), ("elu", {"alpha": 0.7}), ("prelu", {}),
                                                ("swish", {}), ("leaky_relu", {"slope": -0.2})])
def test_igemm_conv3x3_act_matches_the_reference(activation, params):
    cuda_backend()
    rng = np.random.default_rng(12)
    x, weight, bias = _conv_act_inputs(rng, (2, 3, 4, 5))
    slopes = rng.uniform(0.1, 0.4, 5) if activation == "prelu" else None
    sample = registry.Sample((x, weight, bias, slopes), {"activation": activation, **params})
    check_against_reference(registry.get("conv3x3_act"), sample, np.float64, rng, algo="igemm")


def _conv_act_inputs(rng, x_shape):
    """x (float64), a weight of 5 output channels and their bias."""
    return (rng.standard_normal(x_shape), rng.standard_normal((5, x_shape[1], 3, 3)) / 3,
            rng.standard_normal(5))


@needs_cuda
def test_igemm_conv3x3_across_tile_edges():
    """70 output channels (two row tiles of 64), 2 x 6 x 6 = 72 pixels (two column tiles),
    3 x 9 = 27 reduction rows (not a multiple of 8): forward, grad_x and grad_weight."""
    cuda_backend()
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 6, 6))
    weight = rng.standard_normal((70, 3, 3, 3)) / 4
    bias = rng.standard_normal(70)
    check_against_reference(registry.get("conv3x3"), registry.Sample((x, weight, bias)), np.float64, rng,
                            algo="igemm")


@needs_cuda
@pytest.mark.parametrize("splits", [1, 3])
def test_igemm_grad_weight_sums_its_splits_in_order(splits):
    """grad_weight cut into pieces of pixels (a partial sum each, then one fixed-order sum):
    the reference's numbers, whatever the cut."""
    K = cuda_backend().kernel_module("conv_igemm")
    rng = np.random.default_rng(14)
    n, c, k, h, w = 2, 2, 3, 4, 4
    x = rng.standard_normal((n, c, h, w))
    g = rng.standard_normal((k, n * h * w))
    grad_w = to_device(np.full((k, c, 3, 3), np.nan))
    K.grad_weight(to_device(g), to_device(x), grad_w, np if isinstance(grad_w, np.ndarray) else __import__("cupy"),
                  splits=splits)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    g4 = g.reshape(k, n, h, w)
    expected = np.zeros((k, c, 3, 3))
    for i in range(3):
        for j in range(3):
            expected[:, :, i, j] = np.einsum("knhw,nchw->kc", g4, padded[:, :, i:i + h, j:j + w])
    np.testing.assert_allclose(to_host(grad_w), expected, rtol=1e-12, atol=1e-12)


@needs_cuda
def test_igemm_is_chosen_by_name_and_gemm_stays_the_default():
    cuda_backend()
    assert registry.get("conv3x3").algorithms("cuda")[0] == "gemm"
    assert "igemm" in registry.get("conv3x3").algorithms("cuda")
    assert registry.get("conv3x3_act").algorithms("cuda") == ["gemm", "igemm", "igemm_tf32"]
    x = pycnn.Tensor(to_device(np.ones((1, 2, 3, 3), np.float32)))
    weight = pycnn.Tensor(to_device(np.ones((2, 2, 3, 3), np.float32)))
    with pycnn.use_backend("cuda"):
        y = pycnn.functional.conv3x3(x, weight, algo="igemm")
    assert to_host(y.data)[0, 0, 1, 1] == 18.0  # 2 channels x 9 taps of ones


@needs_cuda
def test_set_default_picks_the_auto_conv_algorithm():
    """``routing.set_default`` sets what ``auto`` runs for conv3x3 and conv3x3_act on CUDA
    (None: the backend's own choice, gemm, again)."""
    cuda_backend()
    x = to_device(np.ones((1, 2, 3, 3), np.float32))
    weight = to_device(np.ones((2, 2, 3, 3), np.float32))
    try:
        for name in ("conv3x3", "conv3x3_act"):
            op = registry.get(name)
            for algo in op.algorithms("cuda"):
                routing.set_default(name, "cuda", algo)
                with pycnn.use_backend("cuda"):
                    assert op.resolve((x, weight, None), {})[1] == algo
            routing.set_default(name, "cuda", None)
            with pycnn.use_backend("cuda"):
                assert op.resolve((x, weight, None), {})[1] == "gemm"
    finally:
        for name in ("conv3x3", "conv3x3_act"):
            routing.set_default(name, "cuda", None)


@needs_cuda
def test_pycnn_cuda_conv_is_read_once_and_a_bad_name_is_one_line():
    """``PYCNN_CUDA_CONV`` (read when the backend is imported) sets the default of both conv
    ops; an algorithm conv3x3_act lacks (direct) refuses its calls naming the variable, and a
    fusion then runs unfused; an unknown name refuses both ops'."""
    cb = cuda_backend()
    algorithms = registry.get("conv3x3_act").algorithms("cuda")
    assert cb.conv_default_from_environment(None, "conv3x3_act", algorithms) == (None, None)
    assert cb.conv_default_from_environment(" auto ", "conv3x3_act", algorithms) == (None, None)
    assert cb.conv_default_from_environment("igemm", "conv3x3_act", algorithms) == ("igemm", None)
    assert cb.conv_default_from_environment("direct", "conv3x3_act", algorithms) == \
        (None, "PYCNN_CUDA_CONV must be one of gemm, igemm, igemm_tf32 for conv3x3_act, got 'direct'")
    x = to_device(np.ones((1, 2, 3, 3), np.float32))
    weight = to_device(np.ones((2, 2, 3, 3), np.float32))
    conv, conv_act = registry.get("conv3x3"), registry.get("conv3x3_act")
    try:
        cb.apply_conv_environment("direct")
        with pycnn.use_backend("cuda"):
            assert conv.resolve((x, weight, None), {})[1] == "direct"
            with pytest.raises(ValueError, match="PYCNN_CUDA_CONV must be one of gemm, igemm, igemm_tf32 for "
                                                 "conv3x3_act, got 'direct'"):
                conv_act.resolve((x, weight, None, None), {"activation": "relu"})
            assert routing.plan_fused(conv_act, (x, weight, None, None), {"activation": "relu"}) is None
        cb.apply_conv_environment("fft")
        with pycnn.use_backend("cuda"), pytest.raises(ValueError, match="PYCNN_CUDA_CONV must be one of .* for "
                                                                         "conv3x3, got 'fft'"):
            conv.resolve((x, weight, None), {})
    finally:
        cb.apply_conv_environment(None)
    with pycnn.use_backend("cuda"):
        assert conv.resolve((x, weight, None), {})[1] == "gemm"
        assert conv_act.resolve((x, weight, None, None), {"activation": "relu"})[1] == "gemm"


# ------------------------------------------------------------------ TF32 tensor cores

def _conv_reference(x, weight):
    """float64 conv3x3 (padding 1) of x (N, C, H, W) with weight (K, C, 3, 3)."""
    n, c, h, w = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, weight.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            y += np.einsum("kc,nchw->nkhw", weight[:, :, i, j].astype(np.float64), padded[:, :, i:i + h, j:j + w])
    return y


def test_tf32_rounding_is_to_nearest_with_ties_away_from_zero():
    """cvt.rna.tf32.f32 as emulated (and used by the references below): 10 mantissa bits
    kept, halfway cases away from zero, inf and NaN kept, past the largest TF32 number inf;
    the scalar emulation (the simulator's tf32_round) and the array one agree bit for bit."""
    tensor_cores = cuda_backend().kernel_module("tensor_cores")
    ulp = 2.0 ** -10
    values = np.array([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 4, 1 + 3 * ulp / 4, 1 + ulp + ulp / 2, 0.0, -0.0,
                       np.inf, -np.inf, np.finfo(np.float32).max, 1e-40], np.float32)
    expected = np.array([1 + ulp, -(1 + ulp), 1, 1 + ulp, 1 + 2 * ulp, 0.0, -0.0, np.inf, -np.inf, np.inf,
                         np.float32(1e-40).view(np.uint32) + 0x1000 & 0xFFFFE000], np.float64)
    expected[-1] = np.uint32(expected[-1]).view(np.float32)
    rounded = tensor_cores.tf32_round_array(values)
    np.testing.assert_array_equal(rounded, expected.astype(np.float32))
    assert np.signbit(rounded[6]) and np.isnan(tensor_cores.tf32_round_array(np.array([np.nan], np.float32)))[0]
    bits = np.random.default_rng(15).integers(0, 2 ** 32, 2000, dtype=np.uint64).astype(np.uint32)
    samples = bits.view(np.float32)
    scalar = np.array([tensor_cores._tf32_bits(v) for v in samples], np.float32)
    np.testing.assert_array_equal(scalar.view(np.uint32), tensor_cores.tf32_round_array(samples).view(np.uint32))


@needs_cuda
def test_tf32_kernels_compute_the_products_of_tf32_rounded_operands():
    """Whole 64 x 64 tiles (every warp, every fragment position): forward, and grad_weight
    with a reduction over pixels, equal the float64 products of the TF32-rounded operands
    to float32 accumulation error, and the exact products within the stated TF32 bound."""
    cb = cuda_backend()
    K, tensor_cores = cb.kernel_module("conv_igemm"), cb.kernel_module("tensor_cores")
    rng = np.random.default_rng(16)
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)          # 64 pixels
    weight = (rng.standard_normal((64, 2, 3, 3)) / 3).astype(np.float32)  # 64 outputs, 18 rows
    y = to_device(np.full((1, 64, 8, 8), np.nan, np.float32))
    K.forward(to_device(x), to_device(weight.reshape(64, 18)), y, tensor_cores=True)
    rounded = _conv_reference(tensor_cores.tf32_round_array(x), tensor_cores.tf32_round_array(weight))
    scale = _conv_reference(np.abs(x), np.abs(weight))  # sum |w||x| of every output
    # (tensor cores may round their float32 sums otherwise than to nearest)
    np.testing.assert_allclose(to_host(y), rounded, rtol=0, atol=float(scale.max()) * 1e-5)
    error = np.abs(to_host(y) - _conv_reference(x, weight))
    assert np.all(error <= (2.0 ** -10 + 18 * 2.0 ** -23) * scale + 1e-30)
    assert error.max() > 1e-5  # the operands were rounded: this is not the float32 path

    # grad_weight (64 outputs, 8 x 9 = 72 rows: two column tiles) over 16 pixels
    xs = rng.standard_normal((1, 8, 4, 4)).astype(np.float32)
    g = rng.standard_normal((64, 16)).astype(np.float32)
    grad_w = to_device(np.full((64, 8, 3, 3), np.nan, np.float32))
    K.grad_weight(to_device(g), to_device(xs), grad_w, np if isinstance(grad_w, np.ndarray) else __import__("cupy"),
                  tensor_cores=True)
    xr = np.pad(tensor_cores.tf32_round_array(xs).astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    gr = tensor_cores.tf32_round_array(g).astype(np.float64).reshape(64, 1, 4, 4)
    expected = np.stack([np.stack([np.einsum("knhw,nchw->kc", gr, xr[:, :, i:i + 4, j:j + 4]) for j in range(3)], -1)
                         for i in range(3)], -2)
    np.testing.assert_allclose(to_host(grad_w), expected, rtol=0, atol=float(np.abs(expected).max()) * 1e-5)


@needs_cuda
def test_igemm_tf32_op_is_within_its_stated_error_and_float64_stays_exact():
    """conv3x3_act with algo igemm_tf32: float32 forward, grad_x and grad_weight within
    (2^-10 + R 2^-23) sum |a||b| of the exact float64 results (R: the length of each sum),
    the bias gradient exact in float32; float64 runs the exact kernels (the reference's
    numbers to 1e-10)."""
    cuda_backend()
    rng = np.random.default_rng(17)
    x, weight, bias = _conv_act_inputs(rng, (2, 3, 5, 4))
    sample = registry.Sample((x, weight, bias, None), {"activation": "relu"})
    check_against_reference(registry.get("conv3x3_act"), sample, np.float64, rng, algo="igemm_tf32")

    x32, w32, b32 = (a.astype(np.float32) for a in (x, weight, bias))
    grad = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    xt, wt, bt = (pycnn.Tensor(to_device(a), requires_grad=True) for a in (x32, w32, b32))
    with pycnn.use_backend("cuda"):
        y = pycnn.functional.conv3x3_act(xt, wt, bt, activation="relu", algo="igemm_tf32")
        y.backward(pycnn.Tensor(to_device(grad)))
    z = _conv_reference(x, weight) + bias[None, :, None, None]
    bound = 2.0 ** -10 + 27 * 2.0 ** -23
    y_host = to_host(y.data)
    assert np.all(np.abs(y_host - np.maximum(z, 0)) <= bound * _conv_reference(np.abs(x), np.abs(weight))
                  + np.abs(bias)[None, :, None, None] * 2.0 ** -23 + 1e-12)
    g2 = grad * (z > 0)  # d relu: z's sign agrees wherever |z| is above the bound
    flipped = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    exact_gx = _conv_reference(g2, flipped)
    bound_gx = (2.0 ** -10 + 45 * 2.0 ** -23) * _conv_reference(np.abs(g2), np.abs(flipped))
    assert np.all(np.abs(to_host(xt.grad) - exact_gx) <= bound_gx + 1e-12)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    exact_gw = np.zeros((5, 3, 3, 3))
    scale_gw = np.zeros((5, 3, 3, 3))
    for i in range(3):
        for j in range(3):
            window = padded[:, :, i:i + 5, j:j + 4]
            exact_gw[:, :, i, j] = np.einsum("nkhw,nchw->kc", g2, window)
            scale_gw[:, :, i, j] = np.einsum("nkhw,nchw->kc", np.abs(g2), np.abs(window))
    assert np.all(np.abs(to_host(wt.grad) - exact_gw) <= (2.0 ** -10 + 40 * 2.0 ** -23) * scale_gw + 1e-12)
    np.testing.assert_allclose(to_host(bt.grad), g2.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_tf32_needs_a_gpu_with_tensor_cores(monkeypatch):
    """Before compute capability 8.0 the tf32 kernels are refused in one line that names
    the algorithm, the GPU's capability and what to use instead."""
    tensor_cores = cuda_backend().kernel_module("tensor_cores")
    device = SimpleNamespace(compute_capability=(7, 5))
    monkeypatch.setattr(tensor_cores, "SIMULATED", False)
    monkeypatch.setattr(tensor_cores, "_checked", False)
    monkeypatch.setattr(tensor_cores, "cuda", SimpleNamespace(get_current_device=lambda: device))
    with pytest.raises(ValueError, match=r"algo 'igemm_tf32' needs TF32 tensor cores .* this GPU is 7\.5: use algo"):
        tensor_cores.check_device()
    device.compute_capability = (9, 0)
    tensor_cores.check_device()
