"""The C++ backend ("cpp"): registers the kernels of the extension ``pycnn._C`` in the registry.

Each wrapper makes its inputs C-contiguous, allocates the outputs (``_util.empty_like``:
NaN-filled under test, so an element a kernel forgot to write shows up) and calls ``_C``,
which checks the arrays again and releases the GIL while it runs.  What ``forward`` keeps
on ``ctx`` is private to the matching ``backward`` of this module.

Nothing runs at import: ``pycnn.ops`` hooks ``load`` in with
``registry.add_backend_loader("cpp", ...)``, so the extension is loaded on first use.
"""
from __future__ import annotations

from pycnn._backend import cpp_extension
from pycnn.ops import _util, registry


def _grad_like(grad, x):
    """The incoming gradient as a C-contiguous array of x's dtype."""
    if grad.dtype != x.dtype:
        grad = grad.astype(x.dtype)
    return _util.contiguous(grad)


def _needs_grad(ctx, i: int) -> bool:
    flags = getattr(ctx, "needs_input_grad", None)
    return True if flags is None or i >= len(flags) else bool(flags[i])


# ------------------------------------------------------------------------------ the ops
# x is any shape unless said otherwise; every output has x's shape and dtype.

def _relu(C):
    def forward(ctx, x):
        x = _util.contiguous(x)
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
        x = _util.contiguous(x)
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
        x = _util.contiguous(x)
        weight = _util.contiguous(weight)
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
        x = _util.contiguous(x)
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
        x = _util.contiguous(x)
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


# ------------------------------------------------------------- conv3x3 and 2x2 pooling
# csrc/conv3x3.cpp, csrc/conv3x3_winograd.cpp, csrc/pool.cpp

def _conv3x3(C, algo):
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None -> y (N, K, H, W)
    def forward(ctx, x, weight, bias=None):
        x = _util.contiguous(x)
        weight = _util.contiguous(weight)
        bias = None if bias is None else _util.contiguous(bias)
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
    import numpy as np

    # x (N, C, H, W) -> y (N, C, H//2, W//2); the winner of each window (uint8, 0..3) is kept
    def forward(ctx, x):
        x = _util.contiguous(x)
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
        grad = _util.contiguous(grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype))
        C.maxpool2x2_backward(grad, winner, gx)
        return (gx,)
    return forward, backward


def _avgpool2x2(C):
    def forward(ctx, x):
        x = _util.contiguous(x)
        n, c, h, w = x.shape
        y = _util.empty((n, c, h // 2, w // 2), x.dtype, x)
        C.avgpool2x2_forward(x, y)
        ctx.x_shape, ctx.dtype = x.shape, x.dtype
        return y

    def backward(ctx, grad):
        gx = _util.empty(ctx.x_shape, ctx.dtype, grad)
        grad = _util.contiguous(grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype))
        C.avgpool2x2_backward(grad, gx)
        return (gx,)
    return forward, backward


_OPS = {
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "prelu": _prelu,
    "rrelu": _rrelu,
    "elu": _elu,
}


def load() -> None:
    """Register the C++ implementations, where the extension is built (else nothing)."""
    C = cpp_extension()
    if C is None:
        return
    for name, make in _OPS.items():
        forward, backward = make(C)
        registry.get(name).register("cpp", forward=forward, backward=backward)
    conv = registry.get("conv3x3")
    for algo in ("direct", "winograd"):
        forward, backward = _conv3x3(C, algo)
        conv.register("cpp", forward=forward, backward=backward, algo=algo)
    conv.choose_algo = choose_conv3x3_algo
    for name, make in (("maxpool2x2", _maxpool2x2), ("avgpool2x2", _avgpool2x2)):
        forward, backward = make(C)
        registry.get(name).register("cpp", forward=forward, backward=backward)
