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
from pycnn.ops._util import kernel_array
from pycnn.ops._backend import (Backend, dropout_pair, grad_like, needs_grad, prelu_pair, shape_map_pair,
                                winner_pair)


# ------------------------------------------------------------------------------ the ops
# x is any shape unless said otherwise; every output has x's shape and dtype.

def _maxout_refuses(inputs, params):
    if params.get("pieces", 2) > 256:
        return "more than 256 pieces (the C++ kernel keeps the winner of each group in a uint8)"
    return None


def _fancy_pca(C):
    from pycnn.ops import fancy_pca as spec

    # images (N, 3, H, W) uint8 / float32 / float64 -> out float32 / float32 / float64 (csrc/fancy_pca.cpp)
    def forward(ctx, images, eigvecs, eigvals, alphas, scale=None):
        out = _util.empty(images.shape, spec.output_dtype(images), images)
        params = (kernel_array(np.asarray(a, dtype=np.float64)) for a in (eigvecs, eigvals, alphas))
        C.fancy_pca_apply(images, *params, spec.pixel_scale(images, scale), out)
        ctx.differentiable = images.dtype != np.uint8
        return out

    def backward(ctx, grad):
        return (grad if ctx.differentiable else None,)  # the identity; uint8 images: no gradient
    return forward, backward


# ------------------------------------------------------------- conv3x3 and 2x2 pooling
# csrc/conv3x3.cpp, csrc/conv3x3_winograd.cpp, csrc/conv3x3_winograd4.cpp, csrc/pool.cpp

def _conv3x3(C, algo):
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None -> y (N, K, H, W)
    def forward(ctx, x, weight, bias=None):
        y = _util.empty((x.shape[0], weight.shape[0]) + tuple(x.shape[2:]), x.dtype, x)
        C.conv3x3_forward(x, weight, bias, y, algo)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = _util.empty_like(x) if needs_grad(ctx, 0) else None
        gw = _util.empty_like(weight) if needs_grad(ctx, 1) else None
        gb = _util.empty((weight.shape[0],), x.dtype, x) if ctx.has_bias and needs_grad(ctx, 2) else None
        if gx is not None or gw is not None or gb is not None:
            C.conv3x3_backward(x, weight, grad_like(grad, x), gx, gw, gb, algo)
        return gx, gw, gb
    return forward, backward


def _conv3x3_act_refuses(C):
    """The activations this build of the extension applies in conv3x3_act (swish arrived
    later than the others)."""
    def refuses(inputs, params):
        if params.get("activation", "relu") == "swish" and not hasattr(C, "swish_forward"):
            return "this build of pycnn._C has no swish epilogue (rebuild the extension)"
        return None
    return refuses


def _conv3x3_act(C, algo):
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None, prelu_weight (K,) or None
    #   -> y = act(conv3x3(x, weight) + bias) (N, K, H, W)
    def forward(ctx, x, weight, bias=None, prelu_weight=None, *, activation="relu", slope=0.01, alpha=1.0):
        shape = (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])
        y = _util.empty(shape, x.dtype, x)
        training = any(needs_grad(ctx, i) for i in range(4))
        keep_pre = training and not conv.grad_from_output(activation, slope, alpha, prelu_weight)
        pre = _util.empty(shape, x.dtype, x) if keep_pre else None
        C.conv3x3_act_forward(x, weight, bias, prelu_weight, y, pre, activation, float(slope), float(alpha), algo)
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
                                   gx, gw, gb, ga, *ctx.act_params, algo)
        return gx, gw, gb, ga
    return forward, backward


def _winograd4_refuses(C, also=None):
    """winograd4's ``refuses``: an extension built before csrc/conv3x3_winograd4.cpp does not
    know the algorithm (auto then moves on); ``also``: the op's other reasons."""
    built = "winograd4" in (C.conv3x3_forward.__doc__ or "")

    def refuses(inputs, params):
        if not built:
            return "this build of pycnn._C has no winograd4 (rebuild the extension)"
        return also(inputs, params) if also is not None else None
    return refuses


def choose_conv3x3_algo(shapes, params):
    """The C++ backend's ``auto`` for conv3x3 and conv3x3_act.

    Measured on 2 cores of a Zen 5 (AVX-512), batch 32, float32 (bench/test_conv_pool.py):
    Winograd F(2x2, 3x3) wins from 32 input and output channels on (1.3-1.45x torch for
    H = 16..32, 1.0-1.1x for H = 8, 3-5x the direct kernel for H <= 4); with fewer channels
    the transforms cost more than the saved multiplies and the direct kernel wins (C = 3).

    Winograd F(4x4, 3x3) ("winograd4") where it was measured faster than both others, forward
    and grad_x: 8 <= C, K <= 256 and H, W >= 8 (the table below: 1.2-2x).  Not for C = 3
    (direct 1.3-1.7x faster) or C = 4 (a tie), nor H, W < 8: faster at 4x4 and 6x6, but at
    2x2 (one 4x4 tile per image) F(2x2, 3x3) is faster, and at 3x3 and 5x5 (a tie in
    multiplies: 8x8 outputs computed for 5x5) nothing could be measured cleanly.  Up to 256
    channels: at C = K = 256 it was 1.2x F(2x2) in CPU time, and in `pycnn bench` (2026-11-27,
    load 1.4-1.9, batch 32, 8x8) F(4x4) / F(2x2) / direct fwd+bwd ran 27.3 / 32.8 / 38.9 ms at
    C = K = 256 and 17.3 / 18.3 / 21.3 ms at C = 128, K = 256; above 256 it is unmeasured."""
    c, k = shapes[0][1], shapes[1][0]
    h, w = shapes[0][2], shapes[0][3]
    if (_WINOGRAD4_MIN_CHANNELS <= min(c, k) and max(c, k) <= _WINOGRAD4_MAX_CHANNELS
            and min(h, w) >= _WINOGRAD4_MIN_SIZE):
        return "winograd4"
    return "winograd" if min(c, k) >= _WINOGRAD_MIN_CHANNELS else "direct"


_WINOGRAD_MIN_CHANNELS = 32
# The winograd4 rule's measurements: float32, batch 64, AMD EPYC (Zen 4, AVX-512: _C_avx512),
# 2 threads, ms of CPU time of both threads (OMP_WAIT_POLICY=passive), median of 7-9 rounds
# with the algorithms interleaved (a standalone harness of the three kernels, 2026-11-27; the
# machine was shared, load average 1.4-3.5, so wall-clock medians were often a scheduler tick;
# at load 1.9 they were, e.g. 32,32,32,32: 8.5 / 7.0 / 4.4 ms forward, 64,64,16,16: 8.1 / 5.5
# / 3.6 ms, direct / F(2x2) / F(4x4)), forward / grad_x:
#   C, K, H, W       direct         F(2x2, 3x3)    F(4x4, 3x3)
#   3, 32, 32, 32    1.95 / 1.95    4.11 / 5.49    2.63 / 3.42
#   32, 32, 32, 32   18.0 / 17.7    15.4 / 15.1    10.1 / 10.1
#   32, 64, 16, 16   7.87 / 8.21    5.92 / 6.74    3.25 / 3.85
#   64, 64, 16, 16   16.1 / 16.2    11.7 / 11.4    7.46 / 7.59
#   64, 128, 8, 8    7.54 / 7.32    7.31 / 6.61    4.22 / 4.41
#   128, 128, 8, 8   13.7 / 14.1    11.4 / 10.7    6.75 / 6.21
#   16, 16, 32, 32   3.98 / 3.95    5.00 / 4.61    3.03 / 2.97
#   16, 32, 16, 16   2.18 / 2.19    2.33 / 2.20    1.32 / 1.28
#   8, 16, 32, 32    2.51 / 2.86    3.23 / 3.75    2.06 / 2.07
#   128, 128, 16, 16 57.0 / 56.5    34.7 / 34.4    27.7 / 27.0
#   256, 256, 8, 8   51.3 / 52.6    34.8 / 36.0    29.3 / 30.9
#   64, 64, 6, 6     3.46 / 3.45    2.01 / 2.22    1.81 / 1.80
#   64, 64, 4, 4     3.29 / 3.32    1.14 / 1.16    0.63 / 0.58
#   64, 64, 2, 2     3.36 / 3.27    0.42 / 0.42    0.50 / 0.48
_WINOGRAD4_MIN_CHANNELS, _WINOGRAD4_MAX_CHANNELS, _WINOGRAD4_MIN_SIZE = 8, 256, 8


def _statistics(C, x, running_mean, running_var, training, momentum, eps):
    """(mean, invstd) (C,) that normalise x: the batch's in training (the running statistics
    updated in place, where given), else the running ones."""
    from pycnn.ops.norm import update_running_stats
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
    cpp.elementwise(C)  # relu, leaky_relu, rrelu, elu, sigmoid, tanh, swish (csrc/act_*.cpp)
    cpp.register("prelu", *prelu_pair(C.prelu_forward, C.prelu_backward))
    # the winners are uint8 (0..k-1): more than 256 pieces are refused
    cpp.register("maxout", *winner_pair(C.maxout_forward, C.maxout_backward, np.uint8, activations.maxout_shape,
                                        lambda pieces=2: (int(pieces),)), refuses=_maxout_refuses)
    cpp.register("maxpool2x2", *winner_pair(C.maxpool2x2_forward, C.maxpool2x2_backward, np.uint8, pool.pooled_shape))
    cpp.register("avgpool2x2", *shape_map_pair(C.avgpool2x2_forward, C.avgpool2x2_backward, pool.pooled_shape))
    cpp.register("dropout", *dropout_pair(C.dropout_forward, C.dropout_backward))
    cpp.register("batchnorm", *_batchnorm(C))
    if hasattr(C, "batchnorm_act_forward"):  # (an extension built before batchnorm_act lacks it)
        cpp.register("batchnorm_act", *_batchnorm_act(C))
    cpp.register("fancy_pca", *_fancy_pca(C))
    for algo in ("direct", "winograd", "winograd4"):
        four = algo == "winograd4"
        act_refuses = _conv3x3_act_refuses(C)
        # F(4x4, 3x3) rounds more: about 4.5x the direct kernel's RMS error, 8x its largest
        # (csrc/conv3x3_winograd4.cpp; tests/test_winograd4.py bounds it)
        rounding = 10.0 if four else 1.0
        cpp.register("conv3x3", *_conv3x3(C, algo), algo=algo, refuses=_winograd4_refuses(C) if four else None,
                     rounding=rounding)
        cpp.register("conv3x3_act", *_conv3x3_act(C, algo), algo=algo,
                     refuses=_winograd4_refuses(C, act_refuses) if four else act_refuses, rounding=rounding)
    routing.register_auto("cpp", "conv3x3", choose_conv3x3_algo)
    routing.register_auto("cpp", "conv3x3_act", choose_conv3x3_algo)
    cpp.portable()  # linear, the losses, arithmetic: NumPy with single-threaded BLAS
