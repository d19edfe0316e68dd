"""Batch normalisation (Ioffe & Szegedy 2015), NumPy reference.

Shapes: x is (N, C) or (N, C, H, W); gamma and beta are (C,).  Statistics are taken per
channel over N (and H, W).  Training normalises with the batch mean and the biased
variance and, where running_mean / running_var arrays are given, updates them in place:
    running = (1 - momentum) * running + momentum * batch_statistic
with the unbiased variance for running_var (PyTorch's convention).  Evaluation normalises
with the running statistics.
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
from pycnn.device import array_module
from pycnn.ops import conv
from pycnn.ops.registry import BenchCase, Sample, chain_pair, declare, get


def _check_batchnorm(x, gamma, beta, running_mean=None, running_var=None, training=True,
                     momentum=0.1, eps=1e-5):
    if gamma is None or beta is None:
        raise ValueError("gamma and beta must be arrays of one value per channel; for no scale or shift "
                         "(torch's affine=False) call pycnn.functional.batch_norm with None, or pass ones and zeros")
    _util.check_float_arrays(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    _util.check_ndim("x", x, (2, 4))
    c = x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        if a is not None:
            _util.check_shape(name, a, (c,))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("evaluation mode (training=False) needs running_mean and running_var")
    if training:  # the running statistics are updated in place
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            if a is not None and not getattr(getattr(a, "flags", None), "writeable", True):
                raise ValueError(f"{name} must be a writable array: training updates it in place")
    if training and x.size // c < 2:
        raise ValueError(f"training needs more than one value per channel, got x of shape {tuple(x.shape)}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    _util.check_positive_number("eps", eps)


def _stat_axes(x):
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _channel(v, ndim):
    """(C,) -> a shape that broadcasts over (N, C) or (N, C, H, W)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch statistic, with the
    unbiased variance (``count`` values per channel)."""
    running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    running_var[...] = (1 - momentum) * running_var + momentum * var * (count / (count - 1))


def batchnorm_forward(ctx, x, gamma, beta, running_mean=None, running_var=None, training=True,
                      momentum=0.1, eps=1e-5):
    xp = array_module(x)
    axes = _stat_axes(x)
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, x.size // x.shape[1], momentum)
    else:
        mean, var = running_mean, running_var
    inv_std = (1 / xp.sqrt(var + eps)).astype(x.dtype)
    x_hat = (x - _channel(mean, x.ndim)) * _channel(inv_std, x.ndim)
    ctx.save_for_backward(x_hat, gamma, inv_std)
    ctx.training = training
    return x_hat * _channel(gamma, x.ndim) + _channel(beta, x.ndim)


def batchnorm_backward(ctx, grad):
    x_hat, gamma, inv_std = ctx.saved_tensors
    axes = _stat_axes(grad)
    grad_beta = grad.sum(axis=axes)
    grad_gamma = (grad * x_hat).sum(axis=axes)
    scale = _channel(gamma * inv_std, grad.ndim)
    if ctx.training:
        # the batch statistics depend on x too: remove the mean and the x_hat component
        count = grad.size // grad.shape[1]
        grad_x = scale * (grad - _channel(grad_beta / count, grad.ndim)
                          - x_hat * _channel(grad_gamma / count, grad.ndim))
    else:
        grad_x = grad * scale
    return grad_x, grad_gamma, grad_beta


def _bn_samples(rng, dtype):
    def case(shape, training=True, running=True):
        c = shape[1]
        x = (2 * rng.standard_normal(shape) + 1).astype(dtype)
        gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
        beta = rng.standard_normal(c).astype(dtype)
        params = {"training": training}
        if running:
            params.update(running_mean=rng.standard_normal(c).astype(dtype),
                          running_var=rng.uniform(0.5, 2, c).astype(dtype))
        return Sample((x, gamma, beta), params)
    return [case((4, 3)), case((2, 3, 3, 5)), case((3, 2, 2, 2), running=False),
            case((2, 3, 4, 4), training=False), case((5, 4), training=False)]


def _torch_batchnorm(x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
    import torch
    # the running statistics share memory with the NumPy arrays: updated in place, as ours
    rm = None if running_mean is None else torch.from_numpy(running_mean)
    rv = None if running_var is None else torch.from_numpy(running_var)
    return torch.nn.functional.batch_norm(x, rm, rv, gamma, beta, training=training, momentum=momentum, eps=eps)


def _elements_times(factor):
    return lambda x_shape, *shapes, itemsize=4, **p: factor * itemsize * int(np.prod(x_shape))


declare("batchnorm", forward=batchnorm_forward, backward=batchnorm_backward, check=_check_batchnorm,
        samples=_bn_samples, torch=_torch_batchnorm,
        flops=lambda x_shape, *shapes, **p: 8 * int(np.prod(x_shape)),
        bytes=_elements_times(3),            # read x twice (statistics, normalisation), write y
        backward_bytes=_elements_times(4),   # read x, read grad_y twice (sums, then grad_x), write grad_x
        bench=(BenchCase(((256, 32, 32, 32), (32,), (32,)), where="gpu"),))


# ------------------------------------------------------------------------ batchnorm_act
# Batch norm + activation in one call (the C++ backend applies the activation to each row of
# the normalised output while it is in L1, and folds the activation's gradient into the pass
# that sums the batch norm gradient).  Inputs x, gamma, beta, prelu_weight (C,) for 'prelu'
# (None otherwise); params those of batchnorm plus activation, slope, alpha, as conv3x3_act.
# The reference is the composition of the two references.

def _check_batchnorm_act(x, gamma, beta, prelu_weight=None, running_mean=None, running_var=None, training=True,
                         momentum=0.1, eps=1e-5, activation="relu", slope=0.01, alpha=1.0):
    _check_batchnorm(x, gamma, beta, running_mean, running_var, training, momentum, eps)
    conv.check_activation(x, prelu_weight, x.shape[1], activation, slope, alpha)


def _split(params):
    """(batchnorm's params, the activation's (slope, alpha))."""
    act = {k: params.pop(k) for k in ("slope", "alpha") if k in params}
    return params, act


# the reference: batch norm's, then the activation's (the chain of _bn_act_unfused below)
batchnorm_act_forward, batchnorm_act_backward = chain_pair("batchnorm_act")


def _bn_act_samples(rng, dtype):
    out = []
    with_settings = {"leaky_relu": {"slope": -0.3}, "prelu": {}, "elu": {"alpha": 0.7}}
    plain = [(name, {}) for name in conv.CONV_ACTIVATIONS if name not in with_settings]
    for i, (activation, extra) in enumerate(list(with_settings.items()) + plain):
        for sample in _bn_samples(rng, dtype)[i % 2::2]:
            x, gamma, beta = sample.inputs
            pw = rng.uniform(-0.4, 0.6, x.shape[1]).astype(dtype) if activation == "prelu" else None
            out.append(Sample((x, gamma, beta, pw), dict(sample.params, activation=activation, **extra)))
    return out


def _torch_batchnorm_act(x, gamma, beta, prelu_weight=None, activation="relu", slope=0.01, alpha=1.0, **params):
    act_inputs, act_params = conv.activation_call(activation, prelu_weight, {"slope": slope, "alpha": alpha})
    return get(activation).torch(_torch_batchnorm(x, gamma, beta, **params), *act_inputs, **act_params)


def _bn_act_unfused(inputs, params):
    """batchnorm_act as the ops it fuses (see conv3x3_act's)."""
    params = dict(params)
    activation = params.pop("activation", "relu")
    bn_params, act_params = _split(params)
    act_inputs, act_params = conv.activation_call(activation, inputs[3], {"slope": 0.01, "alpha": 1.0, **act_params})
    return [("batchnorm", tuple(inputs[:3]), bn_params), (activation, act_inputs, act_params)]


def _bn_act_flops(x_shape, *shapes, activation="relu", **params):
    return (8 + conv.EPILOGUES[activation].flops) * int(np.prod(x_shape))


declare("batchnorm_act", forward=batchnorm_act_forward, backward=batchnorm_act_backward, check=_check_batchnorm_act,
        samples=_bn_act_samples, torch=_torch_batchnorm_act, flops=_bn_act_flops,
        bytes=_elements_times(3),            # as batchnorm: the activation is applied in place, in L1
        backward_bytes=_elements_times(5),   # read x, y and grad_y, write grad_x, read it back
        bench=(BenchCase(((64, 32, 32, 32), (32,), (32,), None), {"activation": "relu"}),
               BenchCase(((256, 32, 32, 32), (32,), (32,), None), {"activation": "relu"}, where="gpu")),
        unfused=_bn_act_unfused)
