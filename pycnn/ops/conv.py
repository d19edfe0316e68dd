"""conv3x3: 3x3 convolution, stride 1, zero padding 1, optional bias (NumPy reference).

Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,) or None; y is (N, K, H, W).
As in every deep-learning library this is a cross-correlation:
    y[n, k, h, w] = b[k] + sum_{c, i, j} weight[k, c, i, j] * x_padded[n, c, h + i, w + j]
"""
from __future__ import annotations

import numpy as np

from pycnn._backend import array_module
from pycnn.ops import _util
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
