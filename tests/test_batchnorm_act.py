"""batchnorm_act: batch norm + activation in one pass (csrc/batchnorm.cpp), and nn.Sequential
fusing a BatchNorm with the activation after it.  The op itself is also covered by the tests
generated from the specs (reference, gradcheck, torch, every backend)."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
from pycnn import models, nn
from pycnn.device import cpp_extension
from pycnn.ops import conv

C = cpp_extension()
needs_cpp = pytest.mark.skipif(C is None, reason="the C++ extension is not built")

LAYERS = {"relu": lambda c: nn.ReLU(), "leaky_relu": lambda c: nn.LeakyReLU(-0.2), "prelu": lambda c: nn.PReLU(c),
          "elu": lambda c: nn.ELU(0.7), "swish": lambda c: nn.SiLU()}


def test_every_fused_activation_has_a_layer():
    assert sorted(LAYERS) == sorted(conv.CONV_ACTIVATIONS)


def _forward_calls(timings) -> dict:
    calls = {}
    for (op, _, _, phase), count in timings.calls.items():
        if phase == "forward":
            calls[op] = calls.get(op, 0) + count
    return calls


@needs_cpp
@pytest.mark.parametrize("activation", conv.CONV_ACTIVATIONS)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (8, 6)])
def test_sequential_fuses_batchnorm_and_activation(rng, activation, shape):
    channels = shape[1]
    x = (3 * rng.standard_normal(shape) + 1).astype(np.float32)
    results = []
    for fuse in (True, False):
        pycnn.manual_seed(0)
        net = nn.Sequential(nn.BatchNorm(channels), LAYERS[activation](channels), fuse=fuse)
        net.train()
        for p in net.parameters():  # gamma, beta (and prelu's slopes) away from their defaults
            p.data[...] = np.random.default_rng(1).uniform(0.5, 1.5, p.data.shape) * (1 - 2 * (p.data.ndim == 1))
        with pycnn.profile() as timings:
            xt = pycnn.Tensor(x, requires_grad=True)
            out = net(xt)
            (out * pycnn.Tensor(np.linspace(-1, 1, out.data.size, dtype=np.float32).reshape(shape))).sum().backward()
        calls = _forward_calls(timings)
        if fuse:
            assert calls.get("batchnorm_act") == 1 and "batchnorm" not in calls
        else:
            assert calls.get("batchnorm") == 1 and "batchnorm_act" not in calls
        net.eval()
        evaluated = net(x).numpy()
        results.append((out.numpy(), xt.grad, [p.grad for p in net.parameters()], net[0].running_mean.copy(),
                        net[0].running_var.copy(), evaluated))
    fused, plain = results
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(fused[2], plain[2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fused[3], plain[3])  # running statistics: the same kernel
    np.testing.assert_array_equal(fused[4], plain[4])
    np.testing.assert_allclose(fused[5], plain[5], rtol=1e-5, atol=1e-6)


@needs_cpp
def test_the_readme_net_runs_batchnorm_relu_fused(rng):
    net = models.vgg(3, 8, 4, widths=(4, 8), convs_per_stage=2, activation="relu", batchnorm=True)
    with pycnn.profile() as timings:
        net(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    calls = _forward_calls(timings)
    assert calls.get("batchnorm_act") == 4 and "relu" not in calls and "batchnorm" not in calls


@needs_cpp
def test_the_bindings_refuse_unknown_activations_and_a_missing_prelu_weight(rng):
    # (what the backward pass reads, y or the pre-activation, is the caller's choice:
    # pycnn.ops.conv.grad_from_output, tested in tests/test_conv_act.py)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    c = np.ones(3, np.float32)
    y = np.empty_like(x)
    with pytest.raises(ValueError, match="batchnorm_act_forward: activation must be one of .* got 'gelu'"):
        C.batchnorm_act_forward(x, c * 0, c, c, None, y, None, "gelu")
    with pytest.raises(ValueError, match="activation 'prelu' needs prelu_weight of shape \\(C,\\)"):
        C.batchnorm_act_forward(x, c * 0, c, c, None, y, None, "prelu")


def test_a_prelu_of_the_wrong_width_is_reported_by_prelu():
    """PReLU(2) after BatchNorm(3) is not fused: prelu itself reports the mismatch."""
    net = nn.Sequential(nn.BatchNorm(3), nn.PReLU(2))
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="weight must have one slope per channel of x \\(3\\), got shape \\(2,\\)"):
        net(x)
