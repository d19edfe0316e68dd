"""conv3x3 as implicit GEMM on CUDA (algo "igemm", kernels/conv_igemm.py): forward,
grad_x and grad_weight against the NumPy reference (outputs NaN-filled), across tile edges
(more than 64 output channels and pixels, a reduction that is not a multiple of 8), with
every fused activation, and grad_weight's split sum over pixels.  Runs in Numba's CUDA
simulator; the kernels' registers and spills are checked by tests/test_cuda_ptx.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
from pycnn.ops import registry

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
    op = registry.get("conv3x3_act")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 4, 5))
    weight = rng.standard_normal((5, 3, 3, 3)) / 3
    bias = rng.standard_normal(5)
    slopes = rng.uniform(0.1, 0.4, 5) if activation == "prelu" else None
    sample = registry.Sample((x, weight, bias, slopes), {"activation": activation, **params})
    check_against_reference(op, sample, np.float64, rng, algo="igemm")


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
    assert registry.get("conv3x3_act").algorithms("cuda") == ["gemm", "igemm"]
    x = pycnn.Tensor(to_device(np.ones((1, 2, 3, 3), np.float32)))
    weight = pycnn.Tensor(to_device(np.ones((2, 2, 3, 3), np.float32)))
    with pycnn.use_backend("cuda"):
        y = pycnn.functional.conv3x3(x, weight, algo="igemm")
    assert to_host(y.data)[0, 0, 1, 1] == 18.0  # 2 channels x 9 taps of ones


@needs_cuda
def test_pycnn_cuda_conv_picks_the_auto_conv_algorithm(monkeypatch):
    """``PYCNN_CUDA_CONV`` (read at each call) sets what ``auto`` runs for conv3x3 and
    conv3x3_act on CUDA: how a GPU benchmark compares whole training steps; a bad name is
    one line naming the variable."""
    cuda_backend()
    x = to_device(np.ones((1, 2, 3, 3), np.float32))
    weight = to_device(np.ones((2, 2, 3, 3), np.float32))
    for name, expected in (("conv3x3", ("gemm", "igemm", "direct")), ("conv3x3_act", ("gemm", "igemm"))):
        op = registry.get(name)
        for algo in expected:
            monkeypatch.setenv("PYCNN_CUDA_CONV", algo)
            with pycnn.use_backend("cuda"):
                assert op.resolve((x, weight, None), {})[1] == algo
    monkeypatch.setenv("PYCNN_CUDA_CONV", "direct")
    with pycnn.use_backend("cuda"), pytest.raises(ValueError, match="PYCNN_CUDA_CONV must be one of gemm, igemm"):
        registry.get("conv3x3_act").resolve((x, weight, None), {})
    monkeypatch.delenv("PYCNN_CUDA_CONV")
    with pycnn.use_backend("cuda"):
        assert registry.get("conv3x3").resolve((x, weight, None), {})[1] == "gemm"
