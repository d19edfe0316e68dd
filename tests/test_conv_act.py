"""conv3x3_act (conv3x3 + bias + activation in one pass) beyond the registry-driven tests of
test_ops.py: shapes large enough for every code path of the C++ kernels (AVX-512 blocks of
output channels and pixel vectors, Winograd tiles with odd sizes), what the backward pass
keeps, and nn.Sequential running Conv3x3 + activation as one fused call."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
from pycnn import nn
from pycnn.autograd import Context
from pycnn.ops import conv, registry

# every activation conv3x3_act applies (from the specs), and both signs of its parameter
ACTIVATIONS = [(a, {}) for a in conv.CONV_ACTIVATIONS] + [
    ("leaky_relu", {"slope": 0.1}), ("leaky_relu", {"slope": -0.3}), ("prelu", {"positive": True}),
    ("elu", {"alpha": -0.5})]


def _algorithms():
    algos = registry.get("conv3x3_act").algorithms("cpp")
    if not algos:
        pytest.skip("the C++ extension is not built")
    return algos


def _inputs(rng, n, c, k, h, w, activation, positive=False):
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    pw = rng.uniform(0.05 if positive else -0.3, 0.5, k).astype(np.float32) if activation == "prelu" else None
    return x, weight, bias, pw


def _run(impl, inputs, params, grad):
    ctx = Context(tuple(a is not None for a in inputs))
    y = np.array(impl.forward(ctx, *inputs, **params), copy=True)
    return y, impl.backward(ctx, grad), ctx


@pytest.mark.parametrize("shape", [(2, 16, 13, 11, 13), (1, 3, 2, 17, 9), (2, 32, 8, 8, 8)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation,params", ACTIVATIONS, ids=[f"{a}{p}" for a, p in ACTIVATIONS])
def test_cpp_matches_the_composition_on_larger_shapes(rng, shape, activation, params):
    op = registry.get("conv3x3_act")
    params = dict(params, activation=activation)
    positive = params.pop("positive", False)
    inputs = _inputs(rng, *shape, activation, positive)
    k, h, w = shape[2], shape[3], shape[4]
    grad = rng.standard_normal((shape[0], k, h, w)).astype(np.float32)
    y_ref, grads_ref, _ = _run(op.reference, tuple(None if a is None else a.astype(np.float64) for a in inputs),
                               params, grad.astype(np.float64))
    for algo in _algorithms():
        y, grads, ctx = _run(op.impls[("cpp", algo)], inputs, params, grad)
        scale = np.abs(y_ref).max()
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{algo} forward")
        for i, (g, e) in enumerate(zip(grads, grads_ref)):
            if e is not None:
                np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max(),
                                           err_msg=f"{algo} gradient {i}")
        from_y = conv.grad_from_output(activation, params.get("slope", 0.01), params.get("alpha", 1.0), inputs[3])
        assert ctx.saved_is_pre == (not from_y), "what backward keeps"


def test_inference_keeps_no_preactivation(rng):
    _algorithms()
    impl = registry.get("conv3x3_act").impls[("cpp", "direct")]
    inputs = _inputs(rng, 1, 3, 4, 5, 5, "prelu")
    assert (inputs[3] <= 0).any()
    ctx = Context((False,) * 4)
    impl.forward(ctx, *inputs, activation="prelu")
    assert not ctx.saved_is_pre


def test_output_does_not_tell_negative_slopes_apart():
    """Why the pre-activation is kept for a negative slope (grad_from_output is False): both
    branches give y >= 0, so a backward pass given y alone takes the wrong branch."""
    C = pytest.importorskip("pycnn._C")
    x = np.ones((1, 1, 2, 2), np.float32)
    w = np.full((1, 1, 3, 3), 0.1, np.float32)
    b = np.array([-1.0], np.float32)  # z = 0.4 - 1 < 0 at every pixel
    y, pre = np.empty((1, 1, 2, 2), np.float32), np.empty((1, 1, 2, 2), np.float32)
    C.conv3x3_act_forward(x, w, b, None, y, pre, "leaky_relu", -0.5)
    assert (pre < 0).all() and (y > 0).all()
    grad_bias = {}
    for saved_is_pre, saved in ((True, pre), (False, y)):
        gb = np.empty(1, np.float32)
        C.conv3x3_act_backward(x, w, None, saved, saved_is_pre, np.ones_like(y), None, None, gb, None,
                               "leaky_relu", -0.5)
        grad_bias[saved_is_pre] = float(gb[0])
    assert grad_bias == {True: -2.0, False: 4.0}  # 4 pixels of slope -0.5; from y: the positive branch
    assert not conv.grad_from_output("leaky_relu", slope=-0.5)


def test_the_rule_of_what_backward_keeps():
    """relu always works from y; leaky_relu iff slope >= 0; prelu iff every slope > 0; elu
    and swish never (the specs' ``conv_epilogue``)."""
    positive, mixed = np.array([0.1, 0.2]), np.array([0.1, -0.2])
    assert conv.grad_from_output("relu") and conv.grad_from_output("relu", slope=-1.0)
    assert conv.grad_from_output("leaky_relu", slope=0.0) and not conv.grad_from_output("leaky_relu", slope=-0.1)
    assert conv.grad_from_output("prelu", prelu_weight=positive)
    assert not conv.grad_from_output("prelu", prelu_weight=mixed)
    assert not conv.grad_from_output("elu", alpha=1.0) and not conv.grad_from_output("swish")
    assert set(conv.CONV_ACTIVATIONS) == {"relu", "leaky_relu", "prelu", "elu", "swish"}


def _net(layers, fuse):
    pycnn.manual_seed(0)
    rng = np.random.default_rng(3)
    return nn.Sequential(*layers(rng), fuse=fuse)


LAYERS = {"relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(0.2), "prelu": lambda: nn.PReLU(8),
          "elu": lambda: nn.ELU(0.7), "swish": lambda: nn.SiLU()}


def test_every_fusable_activation_has_a_layer():
    assert sorted(LAYERS) == sorted(conv.CONV_ACTIVATIONS)
    assert all(LAYERS[a]().conv_activation == a for a in LAYERS)


@pytest.mark.parametrize("activation", conv.CONV_ACTIVATIONS)
def test_sequential_fuses_conv_and_activation(rng, activation):
    _algorithms()
    act = LAYERS[activation]

    def layers(r):
        return [nn.Conv3x3(3, 8, rng=r), act(), nn.MaxPool2(), nn.Conv3x3(8, 8, rng=r, algo="winograd"),
                nn.BatchNorm(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5, rng=r)]
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    outputs, grads = [], []
    for fuse in (True, False):
        net = _net(layers, fuse)
        with pycnn.profile() as timings:
            out = net(pycnn.Tensor(x, requires_grad=True))
            out.sum().backward()
        forward_calls = {}
        for (op, _, _, phase), calls in timings.calls.items():
            if phase == "forward":
                forward_calls[op] = forward_calls.get(op, 0) + calls
        # the first conv is fused with its activation; the second is followed by batch norm
        expected = {"conv3x3_act": 1, "conv3x3": 1} if fuse else {"conv3x3": 2}
        assert {op: forward_calls.get(op, 0) for op in ("conv3x3_act", "conv3x3")} == {
            "conv3x3_act": expected.get("conv3x3_act", 0), "conv3x3": expected["conv3x3"]}
        outputs.append(out.numpy())
        grads.append([p.grad for p in net.parameters()])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sequential_does_not_fuse_where_the_backend_lacks_the_fused_op(rng):
    """Under a forced NumPy backend both ops run the reference: fusing changes nothing there."""
    net = nn.Sequential(nn.Conv3x3(2, 3), nn.ReLU())
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    with pycnn.use_backend("numpy"), pycnn.profile() as timings:
        y = net(x)
    assert {key[:2] for key in timings.seconds} == {("conv3x3_act", "numpy")}
    np.testing.assert_allclose(y.numpy(), np.maximum(nn.Sequential(*net, fuse=False)(x).numpy(), 0), rtol=1e-6)
