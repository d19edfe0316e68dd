"""conv3x3: 3x3 convolution, stride 1, zero padding 1, optional bias (NumPy reference).

Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,) or None; y is (N, K, H, W).
As in every deep-learning library this is a cross-correlation:
    y[n, k, h, w] = b[k] + sum_{c, i, j} weight[k, c, i, j] * x_padded[n, c, h + i, w + j]
"""
from __future__ import annotations

import numpy as np

from pycnn.device import array_module
from pycnn.ops import _util, activations
from pycnn.ops.registry import Sample, declare


def _check_conv3x3(x, weight, bias=None):
    _util.check_float_arrays(x=x, weight=weight, bias=bias)
    _util.check_ndim("x", x, 4)
    _util.check_ndim("weight", weight, 4)
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (K, C, 3, 3), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight has {weight.shape[1]} input channels but x has {x.shape[1]} (x is {tuple(x.shape)})")
    if bias is not None:
        _util.check_shape("bias", bias, (weight.shape[0],))
    if 0 in tuple(x.shape):
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")


def im2col3x3(x):
    """(N, C, H, W) -> (N, C*9, H*W): the 9 zero-padded neighbours of every pixel."""
    xp = array_module(x)
    n, c, h, w = x.shape
    padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    taps = [padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return xp.stack(taps, axis=2).reshape(n, c * 9, h * w)


def col2im3x3(cols, x_shape):
    """The adjoint of im2col3x3: (N, C*9, H*W) -> (N, C, H, W), summing overlapping taps."""
    xp = array_module(cols)
    n, c, h, w = x_shape
    taps = cols.reshape(n, c, 3, 3, h, w)
    padded = xp.zeros((n, c, h + 2, w + 2), dtype=cols.dtype)
    for i in range(3):
        for j in range(3):
            padded[:, :, i:i + h, j:j + w] += taps[:, :, i, j]
    return padded[:, :, 1:h + 1, 1:w + 1]


def conv3x3_forward(ctx, x, weight, bias=None):
    n, c, h, w = x.shape
    k = weight.shape[0]
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    y = weight.reshape(k, c * 9) @ im2col3x3(x)  # (K, C*9) @ (N, C*9, H*W) -> (N, K, H*W)
    y = y.reshape(n, k, h, w)
    if bias is not None:
        y += bias.reshape(1, k, 1, 1)
    return y


def conv3x3_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    n, c, h, w = x.shape
    k = weight.shape[0]
    xp = array_module(x)
    grad_rows = grad.reshape(n, k, h * w)
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_cols = weight.reshape(k, c * 9).T @ grad_rows  # (C*9, K) @ (N, K, H*W)
        grad_x = col2im3x3(grad_cols, x.shape)
    if ctx.needs_input_grad[1]:
        cols = im2col3x3(x)
        grad_weight = xp.einsum("nkp,nqp->kq", grad_rows, cols).reshape(weight.shape)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum(axis=(0, 2, 3))
    return grad_x, grad_weight, grad_bias


def _conv_samples(rng, dtype):
    def case(n, c, k, h, w, bias=True):
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype) if bias else None
        return Sample((x, weight, b))
    return [case(2, 3, 4, 5, 6), case(1, 2, 3, 1, 1), case(1, 1, 2, 4, 3, bias=False), case(2, 4, 1, 3, 7)]


def conv3x3_flops(x_shape, w_shape, b_shape=None):
    """Direct-convolution FLOPs of the forward pass: one multiply and one add per tap."""
    n, c, h, w = x_shape
    return 2 * n * w_shape[0] * h * w * c * 9


def conv3x3_bytes(x_shape, w_shape, b_shape=None, itemsize=4):
    n, c, h, w = x_shape
    k = w_shape[0]
    return itemsize * (n * c * h * w + k * c * 9 + k + n * k * h * w)  # read x, w, b; write y


declare("conv3x3", forward=conv3x3_forward, backward=conv3x3_backward, check=_check_conv3x3,
        flops=conv3x3_flops, bytes=conv3x3_bytes, samples=_conv_samples)


# ------------------------------------------------------------------------- conv3x3_act
# conv3x3 + bias + activation in one call (the C++ backend applies the activation where the
# convolution stores its output).  Inputs x, weight, bias (K,) or None, prelu_weight (K,) for
# activation 'prelu' (None otherwise); params activation, slope (leaky_relu), alpha (elu).
# The reference is the composition of the two references above and in activations.py.

class _Part:
    """The context of one part of the composition (what its reference forward keeps)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors = ()

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays


# activation -> (reference forward, reference backward, its extra inputs, its params)
_ACTIVATION_REFS = {
    "relu": (activations.relu_forward, activations.relu_backward, lambda pw: (), lambda slope, alpha: {}),
    "leaky_relu": (activations.leaky_relu_forward, activations.leaky_relu_backward, lambda pw: (),
                   lambda slope, alpha: {"slope": slope}),
    "prelu": (activations.prelu_forward, activations.prelu_backward, lambda pw: (pw,), lambda slope, alpha: {}),
    "elu": (activations.elu_forward, activations.elu_backward, lambda pw: (), lambda slope, alpha: {"alpha": alpha}),
}
CONV_ACTIVATIONS = tuple(_ACTIVATION_REFS)


def _check_conv3x3_act(x, weight, bias=None, prelu_weight=None, activation="relu", slope=0.01, alpha=1.0):
    _check_conv3x3(x, weight, bias)
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    _util.check_finite_number("slope", slope)
    _util.check_finite_number("alpha", alpha)
    if activation == "prelu":
        if prelu_weight is None:
            raise ValueError("activation 'prelu' needs prelu_weight, one slope per output channel")
        _util.check_float_arrays(x=x, prelu_weight=prelu_weight)
        _util.check_shape("prelu_weight", prelu_weight, (weight.shape[0],))
    elif prelu_weight is not None:
        raise ValueError(f"prelu_weight must be None for activation {activation!r}")


def conv3x3_act_forward(ctx, x, weight, bias=None, prelu_weight=None, activation="relu", slope=0.01, alpha=1.0):
    needs = tuple(getattr(ctx, "needs_input_grad", ())) + (True,) * 4
    act_forward, _, act_inputs, act_params = _ACTIVATION_REFS[activation]
    ctx.conv_part, ctx.act_part = _Part(needs[:3]), _Part((True, needs[3]))
    ctx.activation = activation
    z = conv3x3_forward(ctx.conv_part, x, weight, bias)
    return act_forward(ctx.act_part, z, *act_inputs(prelu_weight), **act_params(slope, alpha))


def conv3x3_act_backward(ctx, grad):
    act_grads = _ACTIVATION_REFS[ctx.activation][1](ctx.act_part, grad)
    grad_prelu = act_grads[1] if len(act_grads) > 1 else None
    return conv3x3_backward(ctx.conv_part, act_grads[0]) + (grad_prelu,)


def _conv_act_samples(rng, dtype):
    def case(n, c, k, h, w, activation, bias=True, positive=False, **params):
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype) if bias else None
        pw = rng.uniform(0.05 if positive else -0.3, 0.5, k).astype(dtype) if activation == "prelu" else None
        return Sample((x, weight, b, pw), dict(activation=activation, **params))
    return [case(2, 3, 4, 5, 6, "relu"), case(1, 2, 3, 4, 3, "relu", bias=False),
            case(2, 3, 4, 5, 6, "leaky_relu", slope=0.1), case(1, 2, 5, 3, 4, "leaky_relu", slope=-0.4),
            case(2, 3, 7, 4, 5, "prelu"), case(1, 1, 3, 3, 3, "prelu", bias=False),
            case(1, 2, 4, 4, 4, "prelu", positive=True),
            case(2, 3, 4, 5, 6, "elu", alpha=1.0), case(1, 2, 3, 4, 5, "elu", alpha=-0.5)]


_ACT_FLOPS = {"relu": 1, "leaky_relu": 2, "prelu": 2, "elu": 4}  # per output, as in activations.py


def conv3x3_act_flops(x_shape, w_shape, b_shape=None, pw_shape=None, activation="relu", **params):
    n, c, h, w = x_shape
    return conv3x3_flops(x_shape, w_shape) + _ACT_FLOPS[activation] * n * w_shape[0] * h * w


def conv3x3_act_bytes(x_shape, w_shape, b_shape=None, pw_shape=None, itemsize=4, **params):
    """The conv's bytes (read x, w, b; write y) plus the prelu weight: z never goes to memory."""
    return conv3x3_bytes(x_shape, w_shape, b_shape, itemsize) + itemsize * (w_shape[0] if pw_shape else 0)


declare("conv3x3_act", forward=conv3x3_act_forward, backward=conv3x3_act_backward, check=_check_conv3x3_act,
        flops=conv3x3_act_flops, bytes=conv3x3_act_bytes, samples=_conv_act_samples)
