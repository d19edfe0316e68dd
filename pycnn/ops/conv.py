"""conv3x3: 3x3 convolution, stride 1, zero padding 1, optional bias (NumPy reference).

Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,) or None; y is (N, K, H, W).
As in every deep-learning library this is a cross-correlation:
    y[n, k, h, w] = b[k] + sum_{c, i, j} weight[k, c, i, j] * x_padded[n, c, h + i, w + j]
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
import pycnn.ops.activations  # noqa: F401 (declares the activations conv3x3_act applies)
from pycnn.device import array_module
from pycnn.ops.registry import BenchCase, Sample, all_ops, chain_pair, declare, get


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


def conv3x3_backward_flops(x_shape, w_shape, *shapes, **params):
    """grad_x and grad_weight each cost one forward (the bias gradient is negligible)."""
    return 2 * conv3x3_flops(x_shape, w_shape)


def conv3x3_bytes(x_shape, w_shape, b_shape=None, itemsize=4):
    n, c, h, w = x_shape
    k = w_shape[0]
    return itemsize * (n * c * h * w + k * c * 9 + k + n * k * h * w)  # read x, w, b; write y


def conv3x3_backward_bytes(x_shape, w_shape, b_shape=None, itemsize=4, **params):
    """Read x, w and grad_y; write grad_x, grad_w and grad_b."""
    n, c, h, w = x_shape
    k = w_shape[0]
    return itemsize * (2 * n * c * h * w + 2 * (k * c * 9 + k) + n * k * h * w)


def _torch_conv3x3(x, w, b=None):
    import torch.nn.functional as F
    return F.conv2d(x, w, b, padding=1)


def _conv_bench_inputs(rng, shapes, params):
    """x, weight scaled by 1/sqrt(9 C) (outputs of unit size), bias; float32."""
    x_shape, w_shape, b_shape = shapes[:3]
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = rng.standard_normal(w_shape, dtype=np.float32) / np.float32(np.sqrt(9 * x_shape[1]))
    b = rng.standard_normal(b_shape, dtype=np.float32)
    return (x, w, b) + tuple(None for _ in shapes[3:]), params


def _conv_bench(shapes_ckh, n, where, extra=(), params=None):
    """BenchCases at (C, K, H=W), batch n."""
    return tuple(BenchCase(((n, c, h, h), (k, c, 3, 3), (k,)) + extra, dict(params or {}), where)
                 for c, k, h in shapes_ckh)


# CPU: the shapes of issue 3 (batch 32); GPU: the README net's at CIFAR-10 size (batch 256)
_CONV_BENCH = (_conv_bench([(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8)],
                           32, "cpu")
               + _conv_bench([(3, 32, 32), (32, 32, 32), (64, 64, 16), (128, 128, 8)], 256, "gpu"))

declare("conv3x3", forward=conv3x3_forward, backward=conv3x3_backward, check=_check_conv3x3,
        flops=conv3x3_flops, bytes=conv3x3_bytes, backward_flops=conv3x3_backward_flops,
        backward_bytes=conv3x3_backward_bytes, samples=_conv_samples, torch=_torch_conv3x3,
        bench=_CONV_BENCH, bench_inputs=_conv_bench_inputs)


# ------------------------------------------------------------------------- conv3x3_act
# conv3x3 + bias + activation in one call (the C++ backend applies the activation where the
# convolution stores its output).  Inputs x, weight, bias (K,) or None, prelu_weight (K,) for
# activation 'prelu' (None otherwise); params activation, slope (leaky_relu), alpha (elu).
# The reference is the composition of the two references (registry.chain_pair).

# the activations with a conv epilogue (declared in activations.py, in order)
EPILOGUES = {op.name: op.conv_epilogue for op in all_ops() if op.conv_epilogue is not None}
CONV_ACTIVATIONS = tuple(EPILOGUES)


def activation_call(activation, prelu_weight, params):
    """(its extra inputs, its params) of the activation op inside conv3x3_act."""
    epilogue = EPILOGUES[activation]
    return ((prelu_weight,) if epilogue.weight else ()), {p: params[p] for p in epilogue.params}


def grad_from_output(activation, slope=0.01, alpha=1.0, prelu_weight=None) -> bool:
    """Whether conv3x3_act's backward can work from the output y alone (the rule of each
    activation's spec); else it keeps the pre-activation z.  Every backend asks this."""
    return EPILOGUES[activation].grad_from_output({"slope": slope, "alpha": alpha}, prelu_weight)


def check_activation(x, prelu_weight, channels: int, activation, slope, alpha) -> None:
    """The checks of a fused activation (conv3x3_act, batchnorm_act) on ``channels`` channels."""
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    _util.check_finite_number("slope", slope)
    _util.check_finite_number("alpha", alpha)
    if EPILOGUES[activation].weight:
        if prelu_weight is None:
            raise ValueError(f"activation {activation!r} needs prelu_weight, one slope per output channel")
        _util.check_float_arrays(x=x, prelu_weight=prelu_weight)
        _util.check_shape("prelu_weight", prelu_weight, (channels,))
    elif prelu_weight is not None:
        raise ValueError(f"prelu_weight must be None for activation {activation!r}")


def _check_conv3x3_act(x, weight, bias=None, prelu_weight=None, activation="relu", slope=0.01, alpha=1.0):
    _check_conv3x3(x, weight, bias)
    check_activation(x, prelu_weight, weight.shape[0], activation, slope, alpha)


# the reference: conv3x3's, then the activation's (the chain of _unfused below)
conv3x3_act_forward, conv3x3_act_backward = chain_pair("conv3x3_act")


def _conv_act_samples(rng, dtype):
    def case(n, c, k, h, w, activation, bias=True, positive=False, **params):
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype) if bias else None
        pw = rng.uniform(0.05 if positive else -0.3, 0.5, k).astype(dtype) if activation == "prelu" else None
        return Sample((x, weight, b, pw), dict(activation=activation, **params))
    with_settings = [case(2, 3, 4, 5, 6, "leaky_relu", slope=0.1), case(1, 2, 5, 3, 4, "leaky_relu", slope=-0.4),
                     case(2, 3, 7, 4, 5, "prelu"), case(1, 1, 3, 3, 3, "prelu", bias=False),
                     case(1, 2, 4, 4, 4, "prelu", positive=True),
                     case(2, 3, 4, 5, 6, "elu", alpha=1.0), case(1, 2, 3, 4, 5, "elu", alpha=-0.5)]
    plain = [name for name, epilogue in EPILOGUES.items() if not (epilogue.params or epilogue.weight)]
    return with_settings + [c for name in plain
                            for c in (case(2, 3, 4, 5, 6, name), case(1, 2, 3, 4, 3, name, bias=False))]


def conv3x3_act_flops(x_shape, w_shape, b_shape=None, pw_shape=None, activation="relu", **params):
    n, c, h, w = x_shape
    return conv3x3_flops(x_shape, w_shape) + EPILOGUES[activation].flops * n * w_shape[0] * h * w


def conv3x3_act_bytes(x_shape, w_shape, b_shape=None, pw_shape=None, itemsize=4, **params):
    """The conv's bytes (read x, w, b; write y) plus the prelu weight: z never goes to memory."""
    return conv3x3_bytes(x_shape, w_shape, b_shape, itemsize) + itemsize * (w_shape[0] if pw_shape else 0)


def _torch_conv3x3_act(x, w, b=None, prelu_weight=None, activation="relu", slope=0.01, alpha=1.0):
    act_inputs, act_params = activation_call(activation, prelu_weight, {"slope": slope, "alpha": alpha})
    return get(activation).torch(_torch_conv3x3(x, w, b), *act_inputs, **act_params)


def _unfused(inputs, params):
    """conv3x3_act as the ops it fuses: [(op, extra inputs, params), ...], each op taking the
    output of the one before as its first input."""
    activation = params.get("activation", "relu")
    act_inputs, act_params = activation_call(activation, inputs[3], {"slope": params.get("slope", 0.01),
                                                                      "alpha": params.get("alpha", 1.0)})
    return [("conv3x3", tuple(inputs[:3]), {}), (activation, act_inputs, act_params)]


declare("conv3x3_act", forward=conv3x3_act_forward, backward=conv3x3_act_backward, check=_check_conv3x3_act,
        flops=conv3x3_act_flops, bytes=conv3x3_act_bytes, samples=_conv_act_samples, torch=_torch_conv3x3_act,
        backward_flops=conv3x3_backward_flops,
        backward_bytes=lambda x_shape, w_shape, *shapes, itemsize=4, **p: conv3x3_backward_bytes(x_shape, w_shape,
                                                                                                   itemsize=itemsize),
        bench=_conv_bench([(64, 64, 32), (128, 128, 16)], 32, "cpu", (None,), {"activation": "relu"}),
        bench_inputs=_conv_bench_inputs, unfused=_unfused)
