"""Softmax cross-entropy (NumPy reference), numerically stable through log-sum-exp.

Shapes: logits is (N, C); params: labels (N,) integers in [0, C), label_smoothing in [0, 1),
class_weight (C,) or None.  The result is a 0-d array: the weighted mean over the batch
    loss = sum_i sum_c T[i, c] * w[c] * (-log softmax(logits)[i, c]) / sum_i w[labels[i]]
with T = (1 - eps) * onehot(labels) + eps / C, as PyTorch defines it.  Without weights
and smoothing this is the plain mean of -log p[i, labels[i]], so the gradient is divided by
the batch size and the learning rate does not depend on it.
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
from pycnn.device import array_module, is_cuda_array
from pycnn.ops.registry import Sample, declare


def _check_softmax_ce(logits, labels=None, label_smoothing=0.0, class_weight=None):
    _util.check_float("logits", logits)
    _util.check_ndim("logits", logits, 2)
    n, c = logits.shape
    if n == 0:
        raise ValueError("logits must hold at least one row")
    if labels is None:
        raise TypeError("labels is required: an integer array of shape (N,)")
    if getattr(labels, "dtype", None) is None or np.dtype(labels.dtype).kind not in "iu":
        raise TypeError(f"labels must be an integer array, got {getattr(labels, 'dtype', type(labels).__name__)}")
    _util.check_shape("labels", labels, (n,))
    _util.check_same_device(logits=logits, labels=labels)
    # labels on a GPU are checked where they are used, so that checking them costs no host
    # synchronisation here: on the device by the cuda kernel, by check_label_range in the references
    if not is_cuda_array(labels):
        check_label_range(labels, c)
    try:
        smoothing = float(label_smoothing)
    except (TypeError, ValueError):
        smoothing = float("nan")  # refused below, naming the argument
    if isinstance(label_smoothing, bool) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if class_weight is not None:
        _util.check_float("class_weight", class_weight)
        _util.check_shape("class_weight", class_weight, (c,))
        if float(class_weight.min()) < 0:
            raise ValueError("class_weight must be non-negative")


def check_label_range(labels, classes: int) -> None:
    """labels in [0, classes) (reads them: a host synchronisation for CUDA arrays)."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{int(labels.min())}, {int(labels.max())}]")


def log_softmax(logits):
    xp = array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def _targets(logits, labels, label_smoothing, class_weight):
    """T[i, c] * w[c] (N, C) and the normaliser sum_i w[labels[i]]."""
    xp = array_module(logits)
    n, c = logits.shape
    targets = xp.full((n, c), label_smoothing / c, dtype=logits.dtype)
    targets[xp.arange(n), labels] += logits.dtype.type(1.0 - label_smoothing)
    if class_weight is None:
        return targets, logits.dtype.type(n)
    return targets * class_weight, class_weight[labels].sum()


def softmax_ce_forward(ctx, logits, labels=None, label_smoothing=0.0, class_weight=None):
    if is_cuda_array(labels):
        check_label_range(labels, logits.shape[1])
    logp = log_softmax(logits)
    weighted_targets, total_weight = _targets(logits, labels, label_smoothing, class_weight)
    ctx.save_for_backward(logp, weighted_targets)
    ctx.total_weight = total_weight
    return -(weighted_targets * logp).sum() / total_weight


def softmax_ce_backward(ctx, grad):
    logp, weighted_targets = ctx.saved_tensors
    xp = array_module(logp)
    # d/dz of -sum_c a_c log softmax(z)_c  =  softmax(z) * sum_c a_c - a
    grad_logits = xp.exp(logp) * weighted_targets.sum(axis=1, keepdims=True) - weighted_targets
    return (grad_logits * (grad / ctx.total_weight),)


def _ce_samples(rng, dtype):
    def case(n, c, **params):
        logits = (3 * rng.standard_normal((n, c))).astype(dtype)
        return Sample((logits,), {"labels": rng.integers(0, c, n), **params})
    return [case(5, 4), case(1, 3), case(6, 10, label_smoothing=0.1),
            case(4, 3, class_weight=np.array([0.2, 1.0, 3.0], dtype=dtype)),
            case(4, 5, label_smoothing=0.2, class_weight=np.linspace(0.5, 2, 5).astype(dtype))]


def _torch_ce(logits, labels=None, label_smoothing=0.0, class_weight=None):
    import torch
    weight = None if class_weight is None else torch.as_tensor(class_weight)
    return torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels), weight=weight,
                                             label_smoothing=label_smoothing)


declare("softmax_cross_entropy", forward=softmax_ce_forward, backward=softmax_ce_backward, portable=True,
        check=_check_softmax_ce, samples=_ce_samples, torch=_torch_ce,
        flops=lambda logits_shape, **p: 6 * int(np.prod(logits_shape)),
        bytes=lambda logits_shape, itemsize=4, **p: itemsize * int(np.prod(logits_shape)))


# ------------------------------------------------------------------ multiclass hinge (SVM)
# The Weston-Watkins multiclass SVM loss of CS231n:
#     loss = mean_i sum_{j != labels[i]} max(0, scores[i, j] - scores[i, labels[i]] + margin)

def _check_hinge(scores, labels=None, margin=1.0):
    _check_softmax_ce(scores, labels)
    _util.check_positive_number("margin", margin)


def hinge_forward(ctx, scores, labels=None, margin=1.0):
    if is_cuda_array(labels):
        check_label_range(labels, scores.shape[1])
    xp = array_module(scores)
    n = scores.shape[0]
    rows = xp.arange(n)
    violations = scores - scores[rows, labels][:, None] + scores.dtype.type(margin)
    violations[rows, labels] = 0
    active = violations > 0
    ctx.save_for_backward(active)
    ctx.labels = labels
    return (violations * active).sum() / scores.dtype.type(n)


def hinge_backward(ctx, grad):
    (active,) = ctx.saved_tensors
    xp = array_module(active)
    n = active.shape[0]
    grad_scores = active.astype(grad.dtype)
    grad_scores[xp.arange(n), ctx.labels] = -active.sum(axis=1)
    return (grad_scores * (grad / grad.dtype.type(n)),)


def _hinge_samples(rng, dtype):
    def case(n, c, **params):
        return Sample(((2 * rng.standard_normal((n, c))).astype(dtype),), {"labels": rng.integers(0, c, n), **params})
    return [case(5, 4), case(1, 3), case(6, 10, margin=0.5)]


def _torch_hinge(scores, labels=None, margin=1.0):
    import torch
    # torch divides by the class count as well as the batch
    return scores.shape[1] * torch.nn.functional.multi_margin_loss(scores, torch.as_tensor(labels), margin=margin)


declare("multiclass_hinge", forward=hinge_forward, backward=hinge_backward, check=_check_hinge, portable=True,
        samples=_hinge_samples, torch=_torch_hinge,
        flops=lambda scores_shape, **p: 3 * int(np.prod(scores_shape)),
        bytes=lambda scores_shape, itemsize=4, **p: itemsize * int(np.prod(scores_shape)))
