"""The ops as functions on Tensors (or arrays), recorded for autograd.

Every function here is one registry op; the backend follows the device of the inputs.  The
activations and the poolings (relu, leaky_relu, elu, max_pool2x2, ...: every op whose spec has
an ``Api``) are made from their specs by ``pycnn.frontend``.
"""
from __future__ import annotations

import numpy as np

from pycnn import frontend
from pycnn import random as _random
from pycnn.autograd import Tensor, apply_op
from pycnn.device import array_module

globals().update(frontend.functions(apply_op, __name__))


def conv3x3(x, weight, bias=None, algo: str = "auto") -> Tensor:
    """3x3 convolution, stride 1, zero padding 1: (N, C, H, W) * (K, C, 3, 3) -> (N, K, H, W)."""
    return apply_op("conv3x3", x, weight, bias, algo=algo)


def conv3x3_act(x, weight, bias=None, prelu_weight=None, activation: str = "relu", slope: float = 0.01,
                alpha: float = 1.0, algo: str = "auto") -> Tensor:
    """act(conv3x3(x, weight, bias)) in one pass, for the activations of
    ``pycnn.ops.conv.CONV_ACTIVATIONS``: 'leaky_relu' reads slope, 'elu' alpha and 'prelu'
    prelu_weight (K,).  Same result as the two calls."""
    return apply_op("conv3x3_act", x, weight, bias, prelu_weight, algo=algo, activation=activation,
                    slope=slope, alpha=alpha)


def linear(x, weight, bias=None) -> Tensor:
    """(N, F) @ (O, F)^T + (O,) -> (N, O)."""
    return apply_op("linear", x, weight, bias)


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0, class_weight=None) -> Tensor:
    """Mean softmax cross-entropy of (N, C) logits against (N,) integer labels."""
    labels = labels.data if isinstance(labels, Tensor) else labels
    class_weight = class_weight.data if isinstance(class_weight, Tensor) else class_weight
    dtype = getattr(logits, "dtype", None)
    if class_weight is not None and dtype is not None and getattr(class_weight, "dtype", dtype) != dtype \
            and np.dtype(class_weight.dtype).kind in "fiu":
        class_weight = class_weight.astype(dtype)  # a setting, like the smoothing: the logits' precision
    return apply_op("softmax_cross_entropy", logits, labels=labels, label_smoothing=label_smoothing,
                    class_weight=class_weight)


def multiclass_hinge(scores, labels, margin: float = 1.0) -> Tensor:
    """Mean multiclass SVM loss: sum over wrong classes of max(0, s_j - s_label + margin)."""
    labels = labels.data if isinstance(labels, Tensor) else labels
    return apply_op("multiclass_hinge", scores, labels=labels, margin=margin)


def _affine(x, gamma, beta):
    """gamma and beta, where None (torch's affine=False) the constants 1 and 0 per channel of x,
    which get no gradient."""
    if gamma is not None and beta is not None:
        return gamma, beta
    data = x.data if isinstance(x, Tensor) else x
    if getattr(data, "ndim", 0) < 2:
        return gamma, beta  # the op's check says what x must be
    xp, shape = array_module(data), (data.shape[1],)
    return (xp.ones(shape, data.dtype) if gamma is None else gamma,
            xp.zeros(shape, data.dtype) if beta is None else beta)


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training: bool = True,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation over (N, C) or (N, C, H, W); updates running stats in training.
    gamma or beta None: no scale or no shift (torch's affine=False)."""
    gamma, beta = _affine(x, gamma, beta)
    return apply_op("batchnorm", x, gamma, beta, running_mean=running_mean, running_var=running_var,
                    training=training, momentum=momentum, eps=eps)


def batch_norm_act(x, gamma, beta, prelu_weight=None, running_mean=None, running_var=None, training: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu", slope: float = 0.01,
                   alpha: float = 1.0) -> Tensor:
    """act(batch_norm(x, ...)) in one pass, the activations of conv3x3_act (prelu_weight (C,)
    for 'prelu').  Same result as the two calls."""
    gamma, beta = _affine(x, gamma, beta)
    return apply_op("batchnorm_act", x, gamma, beta, prelu_weight, running_mean=running_mean,
                    running_var=running_var, training=training, momentum=momentum, eps=eps, activation=activation,
                    slope=slope, alpha=alpha)


def dropout(x, p: float = 0.5, training: bool = True, seed: int | None = None) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    frontend.check_training(training)
    if seed is None:
        seed = _random.next_seed() if training else 0
    return apply_op("dropout", x, p=p, training=training, seed=seed)


def flatten(x) -> Tensor:
    """(N, ...) -> (N, product of the rest)."""
    return apply_op("flatten", x)
