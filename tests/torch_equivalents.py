"""Each registry op written in PyTorch (the independent check of the references).

Random ops cannot share PyTorch's generator: rrelu and dropout are written with pycnn's
counter-based draws, so the check covers the formula (slopes, scaling) around them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pycnn.ops import _util


def _t(a):
    return None if a is None else torch.as_tensor(a)


def _rrelu(x, lower=3.0, upper=8.0, training=False, seed=0):
    if not training:
        return F.leaky_relu(x, 2.0 / (lower + upper))
    u = torch.as_tensor(_util.uniform(seed, x.numel(), np.dtype(np.float64))).reshape(x.shape)
    slopes = 1.0 / (lower + (upper - lower) * u)
    assert bool(((slopes >= 1 / upper) & (slopes <= 1 / lower)).all())
    return torch.where(x > 0, x, x * slopes)


def _dropout(x, p=0.5, training=True, seed=0):
    if not training:
        return x * 1
    u = torch.as_tensor(_util.uniform(seed, x.numel(), np.dtype(np.float64))).reshape(x.shape)
    return x * (u >= p) / (1 - p)


def _maxout(x, pieces=2):
    n, c = x.shape[:2]
    return x.reshape((n, c // pieces, pieces) + tuple(x.shape[2:])).max(dim=2).values


def _fancy_pca(x, eigvecs=None, eigvals=None, alphas=None, scale=None):
    """x + scale * eigvecs @ (alphas[n] * eigvals), per image, written in torch."""
    scale = (255.0 if x.dtype == torch.uint8 else 1.0) if scale is None else scale
    delta = (_t(eigvecs) @ (_t(alphas) * _t(eigvals)).T).T * scale  # (N, 3)
    return x + delta.to(x.dtype)[:, :, None, None]


def _batchnorm(x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
    rm = None if running_mean is None else torch.from_numpy(running_mean)  # shares memory: updated in place
    rv = None if running_var is None else torch.from_numpy(running_var)
    return F.batch_norm(x, rm, rv, gamma, beta, training=training, momentum=momentum, eps=eps)


def _conv3x3_act(x, w, b=None, prelu_weight=None, activation="relu", slope=0.01, alpha=1.0):
    z = F.conv2d(x, w, b, padding=1)
    if activation == "prelu":
        return F.prelu(z, prelu_weight)
    return {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, slope), "elu": lambda z: F.elu(z, alpha)}[activation](z)


def _reduce(fn):
    def reduce(x, axis=None, keepdims=False):
        if axis is None:
            return fn(x, dim=tuple(range(x.ndim)), keepdim=keepdims)
        return fn(x, dim=axis, keepdim=keepdims)
    return reduce


TORCH_EQUIVALENTS = {
    "conv3x3": lambda x, w, b=None: F.conv2d(x, w, b, padding=1),
    "conv3x3_act": _conv3x3_act,
    "maxpool2x2": lambda x: F.max_pool2d(x, 2),
    "avgpool2x2": lambda x: F.avg_pool2d(x, 2),
    "relu": F.relu,
    "leaky_relu": lambda x, slope=0.01: F.leaky_relu(x, slope),
    "prelu": F.prelu,
    "rrelu": _rrelu,
    "elu": lambda x, alpha=1.0: F.elu(x, alpha),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "maxout": _maxout,
    "linear": F.linear,
    "softmax_cross_entropy": lambda logits, labels=None, label_smoothing=0.0, class_weight=None: F.cross_entropy(
        logits, torch.as_tensor(labels), weight=_t(class_weight), label_smoothing=label_smoothing),
    "multiclass_hinge": lambda scores, labels=None, margin=1.0: scores.shape[1] * F.multi_margin_loss(
        scores, torch.as_tensor(labels), margin=margin),
    "batchnorm": _batchnorm,
    "dropout": _dropout,
    "fancy_pca": _fancy_pca,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "exp": torch.exp,
    "log": torch.log,
    "abs": torch.abs,
    "pow": lambda x, exponent=2.0: x ** exponent,
    "sum": _reduce(torch.sum),
    "mean": _reduce(torch.mean),
    "reshape": lambda x, shape=None: x.reshape(shape),
    "flatten": lambda x: x.flatten(1),
    "matmul": torch.matmul,
}
