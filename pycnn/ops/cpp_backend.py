"""The C++ backend ("cpp"): registers the kernels of the extension ``pycnn._C`` in the registry.

Every wrapper is registered through ``_any_layout`` (``load``): the one place where the
arrays a kernel reads become C-contiguous, aligned and native-endian, so any valid NumPy
array works (sliced, transposed, negative strides, unaligned, read-only, big-endian).  The
wrappers allocate the outputs (``_util.empty_like``: NaN-filled under test, so an element a
kernel forgot to write shows up) and call ``_C``, which checks the arrays again and releases
the GIL while it runs.  What ``forward`` keeps on ``ctx`` is private to the matching
``backward`` of this module.

Nothing runs at import: ``pycnn.ops`` hooks ``load`` in with
``registry.add_backend_loader("cpp", ...)``, so the extension is loaded on first use.
"""
from __future__ import annotations

import functools

import numpy as np

from pycnn.device import cpp_extension
from pycnn.ops import _util, registry


def kernel_array(a):
    """``a`` as the C++ kernels read it: C-contiguous, aligned and in native byte order (no
    copy when it already is one).  Anything that is not a NumPy array is returned as is."""
    if not isinstance(a, np.ndarray) or (a.flags.c_contiguous and a.flags.aligned and a.dtype.isnative):
        return a
    return np.require(a, a.dtype.newbyteorder("="), ("C_CONTIGUOUS", "ALIGNED"))


def _any_layout(forward, backward):
    """forward(ctx, *inputs, **params) and backward(ctx, grad) with every input array and the
    incoming gradient passed through ``kernel_array`` (params are left alone: running
    statistics are updated in place)."""
    @functools.wraps(forward)
    def forward_any(ctx, *inputs, **params):
        return forward(ctx, *(kernel_array(a) for a in inputs), **params)

    @functools.wraps(backward)
    def backward_any(ctx, grad):
        return backward(ctx, kernel_array(grad))
    return forward_any, backward_any


def _grad_like(grad, x):
    """The incoming gradient (already a kernel array) in x's dtype."""
    return grad if grad.dtype == x.dtype else grad.astype(x.dtype)


def _needs_grad(ctx, i: int) -> bool:
    flags = getattr(ctx, "needs_input_grad", None)
    return True if flags is None or i >= len(flags) else bool(flags[i])


# ------------------------------------------------------------------------------ the ops
# x is any shape unless said otherwise; every output has x's shape and dtype.

def _relu(C):
    def forward(ctx, x):
        y = _util.empty_like(x)
        C.relu_forward(x, y)
        ctx.save_for_backward(x)
        return y

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = _util.empty_like(x)
        C.relu_backward(x, _grad_like(grad, x), gx)
        return (gx,)
    return forward, backward


def _leaky_relu(C):
    def forward(ctx, x, *, slope=0.01):
        y = _util.empty_like(x)
        C.leaky_relu_forward(x, y, float(slope))
        ctx.save_for_backward(x)
        ctx.slope = float(slope)
        return y

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = _util.empty_like(x)
        C.leaky_relu_backward(x, _grad_like(grad, x), gx, ctx.slope)
        return (gx,)
    return forward, backward


def _prelu(C):
    # x is (N, C, ...), weight is (C,)
    def forward(ctx, x, weight):
        y = _util.empty_like(x)
        C.prelu_forward(x, weight, y)
        ctx.save_for_backward(x, weight)
        return y

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = _util.empty_like(x)
        gw = _util.empty_like(weight)  # overwritten by the kernel, not accumulated
        C.prelu_backward(x, weight, _grad_like(grad, x), gx, gw)
        return (gx if _needs_grad(ctx, 0) else None, gw if _needs_grad(ctx, 1) else None)
    return forward, backward


def _rrelu(C):
    # the slopes are not stored: backward regenerates them from (seed, flat index)
    def forward(ctx, x, *, lower=3.0, upper=8.0, training=False, seed=0):
        y = _util.empty_like(x)
        params = (float(lower), float(upper), int(seed), bool(training))
        C.rrelu_forward(x, y, *params)
        ctx.save_for_backward(x)
        ctx.rrelu_params = params
        return y

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = _util.empty_like(x)
        C.rrelu_backward(x, _grad_like(grad, x), gx, *ctx.rrelu_params)
        return (gx,)
    return forward, backward


def _elu(C):
    def forward(ctx, x, *, alpha=1.0):
        y = _util.empty_like(x)
        C.elu_forward(x, y, float(alpha))
        ctx.save_for_backward(x)
        ctx.alpha = float(alpha)
        return y

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = _util.empty_like(x)
        C.elu_backward(x, _grad_like(grad, x), gx, ctx.alpha)
        return (gx,)
    return forward, backward


# ------------------------------------------------- sigmoid, tanh, maxout, dropout (csrc/maps.cpp)

def _map(forward_kernel, backward_kernel):
    """A map y = f(x) whose gradient is computed from x (sigmoid, tanh: from y it would cancel
    where y rounds to 1, csrc/maps.cpp)."""
    def forward(ctx, x):
        y = _util.empty_like(x)
        forward_kernel(x, y)
        ctx.save_for_backward(x)
        return y

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = _util.empty_like(x)
        backward_kernel(x, _grad_like(grad, x), gx)
        return (gx,)
    return forward, backward


def _sigmoid(C):
    return _map(C.sigmoid_forward, C.sigmoid_backward)


def _tanh(C):
    return _map(C.tanh_forward, C.tanh_backward)


def _maxout(C):
    # x (N, C*k, ...) -> y (N, C, ...); the winner of each group (uint8, 0..k-1) is kept.
    # The kernel stores the winner in a uint8: more than 256 pieces run on the reference.
    reference = registry.get("maxout").reference

    def forward(ctx, x, pieces=2):
        if pieces > 256:
            ctx.fallback = True
            return reference.forward(ctx, x, pieces=pieces)
        ctx.fallback = False
        out_shape = (x.shape[0], x.shape[1] // pieces) + tuple(x.shape[2:])
        y = _util.empty(out_shape, x.dtype, x)
        winner = np.empty(out_shape, dtype=np.uint8)  # fully written by the kernel
        C.maxout_forward(x, y, winner, int(pieces))
        ctx.save_for_backward(winner)
        ctx.x_shape, ctx.dtype, ctx.pieces = x.shape, x.dtype, int(pieces)
        return y

    def backward(ctx, grad):
        if ctx.fallback:
            return reference.backward(ctx, grad)
        (winner,) = ctx.saved_tensors
        gx = _util.empty(ctx.x_shape, ctx.dtype, grad)
        grad = grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype)
        C.maxout_backward(grad, winner, gx, ctx.pieces)
        return (gx,)
    return forward, backward


def _dropout(C):
    # the mask is not stored: backward draws it again from (p, seed)
    def forward(ctx, x, p=0.5, training=True, seed=0):
        if not training or p == 0:  # the identity, as the reference
            ctx.dropout = None
            return x
        y = _util.empty_like(x)
        ctx.dropout = (float(p), int(seed))
        C.dropout_forward(x, y, *ctx.dropout)
        ctx.dtype = x.dtype
        return y

    def backward(ctx, grad):
        if ctx.dropout is None:
            return (grad,)
        grad = grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype)
        gx = _util.empty_like(grad)
        C.dropout_backward(grad, gx, *ctx.dropout)
        return (gx,)
    return forward, backward


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
# csrc/conv3x3.cpp, csrc/conv3x3_winograd.cpp, csrc/pool.cpp

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
        gx = _util.empty_like(x) if _needs_grad(ctx, 0) else None
        gw = _util.empty_like(weight) if _needs_grad(ctx, 1) else None
        gb = _util.empty((weight.shape[0],), x.dtype, x) if ctx.has_bias and _needs_grad(ctx, 2) else None
        if gx is not None or gw is not None or gb is not None:
            C.conv3x3_backward(x, weight, _grad_like(grad, x), gx, gw, gb, algo)
        return gx, gw, gb
    return forward, backward


def keeps_preactivation(activation, slope=0.01, alpha=1.0, prelu_weight=None) -> bool:
    """Whether conv3x3_act's backward needs the pre-activation z, not just the output y:
    y > 0 exactly when z > 0 for relu, leaky_relu with slope >= 0 and prelu with every slope
    > 0 (its weight gradient is then sum(g * y) / a); a negative slope or a prelu slope <= 0
    breaks that.  elu always keeps z: its derivative alpha * exp(z) read off the output as
    y + alpha cancels for z << 0 (csrc/conv3x3_act.cpp)."""
    if activation == "prelu":
        return not bool((prelu_weight > 0).all())
    return (activation == "leaky_relu" and slope < 0) or activation == "elu"


def _conv3x3_act(C, algo):
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None, prelu_weight (K,) or None
    #   -> y = act(conv3x3(x, weight) + bias) (N, K, H, W)
    def forward(ctx, x, weight, bias=None, prelu_weight=None, *, activation="relu", slope=0.01, alpha=1.0):
        shape = (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])
        y = _util.empty(shape, x.dtype, x)
        training = any(_needs_grad(ctx, i) for i in range(4))
        keep_pre = training and keeps_preactivation(activation, slope, alpha, prelu_weight)
        pre = _util.empty(shape, x.dtype, x) if keep_pre else None
        C.conv3x3_act_forward(x, weight, bias, prelu_weight, y, pre, activation, float(slope), float(alpha), algo)
        ctx.save_for_backward(x, weight, prelu_weight, pre if keep_pre else y)
        ctx.saved_is_pre, ctx.has_bias = keep_pre, bias is not None
        ctx.act_params = (activation, float(slope), float(alpha))
        return y

    def backward(ctx, grad):
        x, weight, prelu_weight, saved = ctx.saved_tensors
        gx = _util.empty_like(x) if _needs_grad(ctx, 0) else None
        gw = _util.empty_like(weight) if _needs_grad(ctx, 1) else None
        gb = _util.empty((weight.shape[0],), x.dtype, x) if ctx.has_bias and _needs_grad(ctx, 2) else None
        ga = _util.empty_like(prelu_weight) if prelu_weight is not None and _needs_grad(ctx, 3) else None
        if any(g is not None for g in (gx, gw, gb, ga)):
            C.conv3x3_act_backward(x, weight, prelu_weight, saved, ctx.saved_is_pre, _grad_like(grad, x),
                                   gx, gw, gb, ga, *ctx.act_params, algo)
        return gx, gw, gb, ga
    return forward, backward


def choose_conv3x3_algo(backend, shapes, params):
    """The conv3x3 algorithm of the C++ backend for these shapes; other backends: their first.

    Measured on 2 cores of a Zen 5 (AVX-512), batch 32, float32 (bench/test_conv_pool.py):
    Winograd F(2x2, 3x3) wins from 32 input and output channels on (1.3-1.45x torch for
    H = 16..32, 1.0-1.1x for H = 8, 3-5x the direct kernel for H <= 4); with fewer channels
    the transforms cost more than the saved multiplies and the direct kernel wins (C = 3)."""
    if backend != "cpp":
        return registry.get("conv3x3").algorithms(backend)[0]
    c, k = shapes[0][1], shapes[1][0]
    return "winograd" if min(c, k) >= _WINOGRAD_MIN_CHANNELS else "direct"


_WINOGRAD_MIN_CHANNELS = 32


def _maxpool2x2(C):

    # x (N, C, H, W) -> y (N, C, H//2, W//2); the winner of each window (uint8, 0..3) is kept
    def forward(ctx, x):
        n, c, h, w = x.shape
        y = _util.empty((n, c, h // 2, w // 2), x.dtype, x)
        winner = np.empty(y.shape, dtype=np.uint8)
        C.maxpool2x2_forward(x, y, winner)
        ctx.save_for_backward(winner)
        ctx.x_shape, ctx.dtype = x.shape, x.dtype
        return y

    def backward(ctx, grad):
        (winner,) = ctx.saved_tensors
        gx = _util.empty(ctx.x_shape, ctx.dtype, grad)
        grad = grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype)
        C.maxpool2x2_backward(grad, winner, gx)
        return (gx,)
    return forward, backward


def _avgpool2x2(C):
    def forward(ctx, x):
        n, c, h, w = x.shape
        y = _util.empty((n, c, h // 2, w // 2), x.dtype, x)
        C.avgpool2x2_forward(x, y)
        ctx.x_shape, ctx.dtype = x.shape, x.dtype
        return y

    def backward(ctx, grad):
        gx = _util.empty(ctx.x_shape, ctx.dtype, grad)
        grad = grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype)
        C.avgpool2x2_backward(grad, gx)
        return (gx,)
    return forward, backward


def _batchnorm(C):
    from pycnn.ops.norm import update_running_stats

    # x (N, C) or (N, C, H, W); gamma, beta and the statistics (C,)
    def forward(ctx, x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        channels = x.shape[1]
        if training:
            mean, var = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
            C.batchnorm_stats(x, mean, var)
            if running_mean is not None:
                update_running_stats(running_mean, running_var, mean, var, x.size // channels, momentum)
        else:
            mean, var = kernel_array(running_mean), running_var
        invstd = (1 / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)
        y = _util.empty_like(x)
        C.batchnorm_apply(x, mean, gamma * invstd, beta, y)
        ctx.save_for_backward(x, mean, invstd, gamma)
        ctx.training = training
        return y

    def backward(ctx, grad):
        x, mean, invstd, gamma = ctx.saved_tensors
        gx = _util.empty_like(x)
        ggamma, gbeta = _util.empty(gamma.shape, x.dtype, x), _util.empty(gamma.shape, x.dtype, x)
        C.batchnorm_backward(x, mean, invstd, gamma, _grad_like(grad, x), gx, ggamma, gbeta, ctx.training)
        return tuple(g if _needs_grad(ctx, i) else None for i, g in enumerate((gx, ggamma, gbeta)))
    return forward, backward


_OPS = {
    "batchnorm": _batchnorm,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "prelu": _prelu,
    "rrelu": _rrelu,
    "elu": _elu,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
    "maxout": _maxout,
    "dropout": _dropout,
    "fancy_pca": _fancy_pca,
}


def load() -> None:
    """Register the C++ implementations, where the extension is built (else nothing)."""
    C = cpp_extension()
    if C is None:
        return
    for name, make in _OPS.items():
        forward, backward = _any_layout(*make(C))
        registry.get(name).register("cpp", forward=forward, backward=backward)
    conv = registry.get("conv3x3")
    for algo in ("direct", "winograd"):
        forward, backward = _any_layout(*_conv3x3(C, algo))
        conv.register("cpp", forward=forward, backward=backward, algo=algo)
    conv.choose_algo = choose_conv3x3_algo
    conv_act = registry.get("conv3x3_act")
    for algo in ("direct", "winograd"):
        forward, backward = _any_layout(*_conv3x3_act(C, algo))
        conv_act.register("cpp", forward=forward, backward=backward, algo=algo)
    conv_act.choose_algo = choose_conv3x3_algo
    for name, make in (("maxpool2x2", _maxpool2x2), ("avgpool2x2", _avgpool2x2)):
        forward, backward = _any_layout(*make(C))
        registry.get(name).register("cpp", forward=forward, backward=backward)
