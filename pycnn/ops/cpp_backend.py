"""The C++ backend ("cpp"): registers the kernels of the extension ``pycnn._C`` in the registry.

Every wrapper is registered through ``Backend.register`` (pycnn/ops/_backend.py, the idiom
of both compiled backends) with ``_util.kernel_array``: the one place where the arrays a
kernel reads become C-contiguous, aligned and native-endian, so any valid NumPy
array works (sliced, transposed, negative strides, unaligned, read-only, big-endian).  The
wrappers allocate the outputs (``_util.empty_like``: NaN-filled under test, so an element a
kernel forgot to write shows up) and call ``_C``, which checks the arrays again and releases
the GIL while it runs.  What ``forward`` keeps on ``ctx`` is private to the matching
``backward`` of this module.

Nothing runs at import: ``pycnn.ops`` hooks ``load`` in with
``registry.add_backend_loader("cpp", ...)``, so the extension is loaded on first use.
"""
from __future__ import annotations

import numpy as np

from pycnn.device import cpp_extension
from pycnn.ops import _util, activations, conv, pool, routing
from pycnn.ops import fancy_pca as fancy_pca_spec
from pycnn.ops._backend import (
    Backend,
    dropout_pair,
    grad_like,
    needs_grad,
    prelu_pair,
    shape_map_pair,
    winner_pair,
)
from pycnn.ops._util import kernel_array
from pycnn.ops.norm import update_running_stats
from pycnn.ops.registry import Algo

# ------------------------------------------------------------------------------ the ops
# x is any shape unless said otherwise; every output has x's shape and dtype.

def _maxout_refuses(inputs, params):
    if params.get("pieces", 2) > 256:
        return "more than 256 pieces (the C++ kernel keeps the winner of each group in a uint8)"
    return None


def _fancy_pca(C):
    # images (N, 3, H, W) uint8 / float32 / float64 -> out float32 / float32 / float64 (csrc/fancy_pca.cpp)
    def forward(ctx, images, eigvecs, eigvals, alphas, scale=None):
        out = _util.empty(images.shape, fancy_pca_spec.output_dtype(images), images)
        params = (kernel_array(np.asarray(a, dtype=np.float64)) for a in (eigvecs, eigvals, alphas))
        C.fancy_pca_apply(images, *params, fancy_pca_spec.pixel_scale(images, scale), out)
        ctx.differentiable = images.dtype != np.uint8
        return out

    def backward(ctx, grad):
        return (grad if ctx.differentiable else None,)  # the identity; uint8 images: no gradient
    return forward, backward


# ------------------------------------------------------------- conv3x3 and 2x2 pooling
# csrc/conv3x3.cpp, csrc/conv3x3_winograd.cpp, csrc/conv3x3_winograd4.cpp, csrc/pool.cpp

def _conv3x3(C, algo: Algo):
    name = algo.value
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None -> y (N, K, H, W)
    def forward(ctx, x, weight, bias=None):
        y = _util.empty((x.shape[0], weight.shape[0]) + tuple(x.shape[2:]), x.dtype, x)
        C.conv3x3_forward(x, weight, bias, y, name)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = _util.empty_like(x) if needs_grad(ctx, 0) else None
        gw = _util.empty_like(weight) if needs_grad(ctx, 1) else None
        gb = _util.empty((weight.shape[0],), x.dtype, x) if ctx.has_bias and needs_grad(ctx, 2) else None
        grad = grad_like(grad, x)
        if gx is not None:
            C.conv3x3_grad_x(grad, weight, gx, name)
        if gw is not None or gb is not None:  # grad_weight's call also gives grad_bias
            C.conv3x3_grad_weight(x, grad, gw, gb, name)
        return gx, gw, gb
    return forward, backward


def _conv3x3_act(C, algo: Algo):
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None, prelu_weight (K,) or None
    #   -> y = act(conv3x3(x, weight) + bias) (N, K, H, W)
    name = algo.value

    def forward(ctx, x, weight, bias=None, prelu_weight=None, *, activation="relu", slope=0.01, alpha=1.0):
        shape = (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])
        y = _util.empty(shape, x.dtype, x)
        training = any(needs_grad(ctx, i) for i in range(4))
        # the one rule of what the backward pass needs (the C++ kernels follow saved_is_pre)
        keep_pre = training and not conv.grad_from_output(activation, slope, alpha, prelu_weight)
        pre = _util.empty(shape, x.dtype, x) if keep_pre else None
        C.conv3x3_act_forward(x, weight, bias, prelu_weight, y, pre, activation, float(slope), float(alpha), name)
        ctx.save_for_backward(x, weight, prelu_weight, pre if keep_pre else y)
        ctx.saved_is_pre, ctx.has_bias = keep_pre, bias is not None
        ctx.act_params = (activation, float(slope), float(alpha))
        return y

    def backward(ctx, grad):
        x, weight, prelu_weight, saved = ctx.saved_tensors
        gx = _util.empty_like(x) if needs_grad(ctx, 0) else None
        gw = _util.empty_like(weight) if needs_grad(ctx, 1) else None
        gb = _util.empty((weight.shape[0],), x.dtype, x) if ctx.has_bias and needs_grad(ctx, 2) else None
        ga = _util.empty_like(prelu_weight) if prelu_weight is not None and needs_grad(ctx, 3) else None
        if any(g is not None for g in (gx, gw, gb, ga)):
            C.conv3x3_act_backward(x, weight, prelu_weight, saved, ctx.saved_is_pre, grad_like(grad, x),
                                   gx, gw, gb, ga, *ctx.act_params, name)
        return gx, gw, gb, ga
    return forward, backward


def choose_conv3x3_algo(shapes, params) -> Algo:
    """The C++ backend's ``auto`` for conv3x3 and conv3x3_act.

    Winograd F(4x4, 3x3) from 8 up to 256 input and output channels on maps of at least 8x8;
    else Winograd F(2x2, 3x3) from 32 channels; else the direct kernel.  Measured forward and
    grad_x, float32, on 2 cores of AMD EPYC (Zen 4 and Zen 5, AVX-512), batch 32-64
    (bench/test_conv_pool.py; `pycnn bench`): the transforms cost more than the multiplies they
    save below 8 channels (first layers, C = 3: direct 1.3-1.7x faster); below 8x8, F(4x4, 3x3)
    is faster at 4x4 and 6x6 but slower at 2x2 (one tile per image) and unmeasured at 3x3 and
    5x5, so it is not chosen there; above 256 channels it is unmeasured."""
    c, k = shapes[0][1], shapes[1][0]
    h, w = shapes[0][2], shapes[0][3]
    if (_WINOGRAD4_MIN_CHANNELS <= min(c, k) and max(c, k) <= _WINOGRAD4_MAX_CHANNELS
            and min(h, w) >= _WINOGRAD4_MIN_SIZE):
        return Algo.WINOGRAD4
    return Algo.WINOGRAD if min(c, k) >= _WINOGRAD_MIN_CHANNELS else Algo.DIRECT


_WINOGRAD_MIN_CHANNELS = 32
_WINOGRAD4_MIN_CHANNELS, _WINOGRAD4_MAX_CHANNELS, _WINOGRAD4_MIN_SIZE = 8, 256, 8


def _statistics(C, x, running_mean, running_var, training, momentum, eps):
    """(mean, invstd) (C,) that normalise x: the batch's in training (the running statistics
    updated in place, where given), else the running ones."""
    channels = x.shape[1]
    if training:
        mean, var = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
        C.batchnorm_stats(x, mean, var)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, x.size // channels, momentum)
    else:
        mean, var = kernel_array(running_mean), running_var
    return mean, (1 / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)


def _batchnorm(C):
    # x (N, C) or (N, C, H, W); gamma, beta and the statistics (C,)
    def forward(ctx, x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        mean, invstd = _statistics(C, x, running_mean, running_var, training, momentum, eps)
        y = _util.empty_like(x)
        C.batchnorm_apply(x, mean, gamma * invstd, beta, y)
        ctx.save_for_backward(x, mean, invstd, gamma)
        ctx.training = training
        return y

    def backward(ctx, grad):
        x, mean, invstd, gamma = ctx.saved_tensors
        gx = _util.empty_like(x)
        ggamma, gbeta = _util.empty(gamma.shape, x.dtype, x), _util.empty(gamma.shape, x.dtype, x)
        C.batchnorm_backward(x, mean, invstd, gamma, grad_like(grad, x), gx, ggamma, gbeta, ctx.training)
        return tuple(g if needs_grad(ctx, i) else None for i, g in enumerate((gx, ggamma, gbeta)))
    return forward, backward


def _batchnorm_act(C):
    # x (N, C) or (N, C, H, W); gamma, beta, prelu_weight (prelu only) and the statistics (C,)
    #   -> y = act(batchnorm(x)); what is saved for the backward pass as in conv3x3_act
    def forward(ctx, x, gamma, beta, prelu_weight=None, *, running_mean=None, running_var=None, training=True,
                momentum=0.1, eps=1e-5, activation="relu", slope=0.01, alpha=1.0):
        mean, invstd = _statistics(C, x, running_mean, running_var, training, momentum, eps)
        y = _util.empty_like(x)
        keep_pre = any(needs_grad(ctx, i) for i in range(4)) and \
            not conv.grad_from_output(activation, slope, alpha, prelu_weight)
        pre = _util.empty_like(x) if keep_pre else None
        C.batchnorm_act_forward(x, mean, gamma * invstd, beta, prelu_weight, y, pre, activation, float(slope),
                                float(alpha))
        ctx.save_for_backward(x, mean, invstd, gamma, prelu_weight, pre if keep_pre else y)
        ctx.training, ctx.saved_is_pre = training, keep_pre
        ctx.act_params = (activation, float(slope), float(alpha))
        return y

    def backward(ctx, grad):
        x, mean, invstd, gamma, prelu_weight, saved = ctx.saved_tensors
        gx = _util.empty_like(x)
        ggamma, gbeta = _util.empty(gamma.shape, x.dtype, x), _util.empty(gamma.shape, x.dtype, x)
        ga = _util.empty_like(prelu_weight) if prelu_weight is not None and needs_grad(ctx, 3) else None
        C.batchnorm_act_backward(x, mean, invstd, gamma, prelu_weight, saved, ctx.saved_is_pre, grad_like(grad, x),
                                 gx, ggamma, gbeta, ga, ctx.training, *ctx.act_params)
        return tuple(g if needs_grad(ctx, i) else None for i, g in enumerate((gx, ggamma, gbeta))) + (ga,)
    return forward, backward


def load() -> None:
    """Register the C++ implementations, where the extension is built (else nothing)."""
    C = cpp_extension()
    if C is None:
        return
    cpp = Backend("cpp", kernel_array)
    cpp.elementwise(C)  # every map with bindings <op>_forward / <op>_backward (csrc/act_*.cpp)
    cpp.register("prelu", *prelu_pair(C.prelu_forward, C.prelu_backward))
    # the winners are uint8 (0..k-1): more than 256 pieces are refused
    cpp.register("maxout", *winner_pair(C.maxout_forward, C.maxout_backward, np.uint8, activations.maxout_shape,
                                        lambda pieces=2: (int(pieces),)), refuses=_maxout_refuses)
    cpp.register("max_pool2x2", *winner_pair(C.maxpool2x2_forward, C.maxpool2x2_backward, np.uint8, pool.pooled_shape))
    cpp.register("avg_pool2x2", *shape_map_pair(C.avgpool2x2_forward, C.avgpool2x2_backward, pool.pooled_shape))
    cpp.register("dropout", *dropout_pair(C.dropout_forward, C.dropout_backward))
    cpp.register("batchnorm", *_batchnorm(C))
    cpp.register("batchnorm_act", *_batchnorm_act(C))
    cpp.register("fancy_pca", *_fancy_pca(C))
    for algo in (Algo.DIRECT, Algo.WINOGRAD, Algo.WINOGRAD4):
        # F(4x4, 3x3) rounds more: about 4.5x the direct kernel's RMS error, 8x its largest
        # (csrc/conv3x3_winograd4.cpp; tests/test_winograd4.py bounds it)
        rounding = 10.0 if algo == Algo.WINOGRAD4 else 1.0
        cpp.register("conv3x3", *_conv3x3(C, algo), algo=algo, rounding=rounding)
        cpp.register("conv3x3_act", *_conv3x3_act(C, algo), algo=algo, rounding=rounding)
    routing.register_auto("cpp", "conv3x3", choose_conv3x3_algo)
    routing.register_auto("cpp", "conv3x3_act", choose_conv3x3_algo)
    cpp.portable()  # linear, the losses, arithmetic: NumPy with single-threaded BLAS
