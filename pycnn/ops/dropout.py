"""Inverted dropout (NumPy reference).

Training: each element is kept when its counter-based uniform number (``_util.uniform``
for ``seed``) is >= p, and kept elements are scaled by 1 / (1 - p), so evaluation is the
identity and needs no rescaling.  p = 1 drops everything.
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
from pycnn.device import array_module
from pycnn.ops.registry import Sample, declare, map_bench


def _check_dropout(x, p=0.5, training=True, seed=0):
    _util.check_float("x", x)
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    _util.check_seed(seed)


def dropout_mask(x, p, seed):
    """The keep-and-scale factor of every element: 0 or 1 / (1 - p), shaped like x."""
    if p >= 1.0:
        return array_module(x).zeros_like(x)
    keep = _util.uniform(seed, x.size, x.dtype, like=x).reshape(x.shape) >= x.dtype.type(p)
    return keep * x.dtype.type(1.0 / (1.0 - p))


def dropout_forward(ctx, x, p=0.5, training=True, seed=0):
    if not training or p == 0:
        ctx.save_for_backward(None)
        return x
    mask = dropout_mask(x, p, seed)
    ctx.save_for_backward(mask)
    return x * mask


def dropout_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return (grad if mask is None else grad * mask,)


def _dropout_samples(rng, dtype):
    return [Sample((rng.standard_normal((4, 3, 5, 5)).astype(dtype),), {"p": 0.5, "seed": 3}),
            Sample((rng.standard_normal((3, 7)).astype(dtype),), {"p": 0.2, "seed": 11}),
            Sample((rng.standard_normal((2, 5)).astype(dtype),), {"p": 0.5, "training": False})]


def _torch_dropout(x, p=0.5, training=True, seed=0):
    """Written with pycnn's counter-based draws (torch's generator differs): checks the scaling."""
    import torch
    if not training:
        return x * 1
    u = torch.as_tensor(_util.uniform(seed, x.numel(), np.dtype(np.float64))).reshape(x.shape)
    return x * (u >= p) / (1 - p)


def _torch_native_dropout(x, p=0.5, training=True, seed=0):
    import torch.nn.functional as F
    return F.dropout(x, p, training=training)


def _elements(factor):
    return lambda x_shape, itemsize=4, **p: factor * itemsize * int(np.prod(x_shape))


declare("dropout", forward=dropout_forward, backward=dropout_backward, check=_check_dropout,
        samples=_dropout_samples, torch=_torch_dropout, torch_native=_torch_native_dropout,
        flops=lambda x_shape, **p: 12 * int(np.prod(x_shape)),
        bytes=_elements(2),           # read x, write y
        backward_bytes=_elements(2),  # read grad_y, write grad_x (the mask is drawn again from the seed)
        bench=map_bench({"p": 0.5, "seed": 1, "training": True}))
