"""linear: a fully connected layer (NumPy reference).

Shapes: x is (N, F), weight is (O, F) (PyTorch's layout), bias is (O,) or None; y is (N, O).

On NumPy arrays the matmuls run with NumPy's BLAS limited to one thread (restored after):
a multi-threaded BLAS would leave helper threads spinning on the cores the C++ kernels of
the next layers need (pycnn/_threads.py).
"""
from __future__ import annotations

import pycnn.ops._util as _util
from pycnn._threads import blas_single_threaded
from pycnn.ops.registry import Sample, declare


def _check_linear(x, weight, bias=None):
    _util.check_float_arrays(x=x, weight=weight, bias=bias)
    _util.check_ndim("x", x, 2)
    _util.check_ndim("weight", weight, 2)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input features but x has {x.shape[1]} "
                         f"(x is {tuple(x.shape)}, weight is {tuple(weight.shape)})")
    if bias is not None:
        _util.check_shape("bias", bias, (weight.shape[0],))


def linear_forward(ctx, x, weight, bias=None):
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    with blas_single_threaded(x, weight):
        y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    with blas_single_threaded(x, weight, grad):
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.T @ x if ctx.needs_input_grad[1] else None
    grad_bias = grad.sum(axis=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


def _linear_samples(rng, dtype):
    def case(n, f, o, bias=True):
        return Sample((rng.standard_normal((n, f)).astype(dtype), rng.standard_normal((o, f)).astype(dtype),
                       rng.standard_normal(o).astype(dtype) if bias else None))
    return [case(3, 5, 4), case(1, 7, 2), case(2, 3, 3, bias=False)]


def _linear_flops(x_shape, w_shape, b_shape=None):
    return 2 * x_shape[0] * w_shape[0] * w_shape[1]


def _linear_bytes(x_shape, w_shape, b_shape=None, itemsize=4):
    n, f = x_shape
    o = w_shape[0]
    return itemsize * (n * f + o * f + o + n * o)


def _torch_linear(x, weight, bias=None):
    import torch.nn.functional as F
    return F.linear(x, weight, bias)


declare("linear", forward=linear_forward, backward=linear_backward, check=_check_linear, portable=True,
        flops=_linear_flops, bytes=_linear_bytes, samples=_linear_samples, torch=_torch_linear,
        backward_flops=lambda x_shape, w_shape, b_shape=None: 2 * _linear_flops(x_shape, w_shape))
