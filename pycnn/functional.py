"""The ops as functions on Tensors (or arrays), recorded for autograd.

Every function here is one registry op; the backend follows the device of the inputs.
"""
from __future__ import annotations

import numpy as np

from pycnn import random as _random
from pycnn.autograd import Tensor, apply_op


def conv3x3(x, weight, bias=None, algo: str = "auto") -> Tensor:
    """3x3 convolution, stride 1, zero padding 1: (N, C, H, W) * (K, C, 3, 3) -> (N, K, H, W)."""
    return apply_op("conv3x3", x, weight, bias, algo=algo)


def conv3x3_act(x, weight, bias=None, prelu_weight=None, activation: str = "relu", slope: float = 0.01,
                alpha: float = 1.0, algo: str = "auto") -> Tensor:
    """act(conv3x3(x, weight, bias)) in one pass: activation 'relu', 'leaky_relu' (slope),
    'prelu' (prelu_weight, (K,)), 'elu' (alpha) or 'swish'.  Same result as the two calls."""
    return apply_op("conv3x3_act", x, weight, bias, prelu_weight, algo=algo, activation=activation,
                    slope=slope, alpha=alpha)


def max_pool2x2(x) -> Tensor:
    """2x2 max pooling, stride 2: (N, C, H, W) -> (N, C, H//2, W//2)."""
    return apply_op("maxpool2x2", x)


def avg_pool2x2(x) -> Tensor:
    """2x2 average pooling, stride 2: (N, C, H, W) -> (N, C, H//2, W//2)."""
    return apply_op("avgpool2x2", x)


def relu(x) -> Tensor:
    return apply_op("relu", x)


def leaky_relu(x, slope: float = 0.01) -> Tensor:
    return apply_op("leaky_relu", x, slope=slope)


def prelu(x, weight) -> Tensor:
    """Leaky ReLU with a learnable slope per channel (axis 1): weight is (C,)."""
    return apply_op("prelu", x, weight)


def _check_training(training) -> None:
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")


def rrelu(x, lower: float = 3.0, upper: float = 8.0, training: bool = False, seed: int | None = None) -> Tensor:
    """Randomized leaky ReLU: slopes 1/U(lower, upper) per element in training (a new draw per
    call unless ``seed`` is given), the fixed slope 2/(lower+upper) in evaluation."""
    _check_training(training)
    if seed is None:
        seed = _random.next_seed() if training else 0
    return apply_op("rrelu", x, lower=lower, upper=upper, training=training, seed=seed)


def elu(x, alpha: float = 1.0) -> Tensor:
    return apply_op("elu", x, alpha=alpha)


def sigmoid(x) -> Tensor:
    return apply_op("sigmoid", x)


def tanh(x) -> Tensor:
    return apply_op("tanh", x)


def swish(x) -> Tensor:
    """x * sigmoid(x) (SiLU); 0 at -inf, and its gradient 0 and 1 at -inf and +inf."""
    return apply_op("swish", x)


silu = swish


def maxout(x, pieces: int = 2) -> Tensor:
    """Max over groups of ``pieces`` consecutive channels: (N, C*k, ...) -> (N, C, ...)."""
    return apply_op("maxout", x, pieces=pieces)


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


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training: bool = True,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation over (N, C) or (N, C, H, W); updates running stats in training."""
    return apply_op("batchnorm", x, gamma, beta, running_mean=running_mean, running_var=running_var,
                    training=training, momentum=momentum, eps=eps)


def batch_norm_act(x, gamma, beta, prelu_weight=None, running_mean=None, running_var=None, training: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu", slope: float = 0.01,
                   alpha: float = 1.0) -> Tensor:
    """act(batch_norm(x, ...)) in one pass, the activations of conv3x3_act (prelu_weight (C,)
    for 'prelu').  Same result as the two calls."""
    return apply_op("batchnorm_act", x, gamma, beta, prelu_weight, running_mean=running_mean,
                    running_var=running_var, training=training, momentum=momentum, eps=eps, activation=activation,
                    slope=slope, alpha=alpha)


def dropout(x, p: float = 0.5, training: bool = True, seed: int | None = None) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    _check_training(training)
    if seed is None:
        seed = _random.next_seed() if training else 0
    return apply_op("dropout", x, p=p, training=training, seed=seed)


def flatten(x) -> Tensor:
    """(N, ...) -> (N, product of the rest)."""
    return apply_op("flatten", x)
