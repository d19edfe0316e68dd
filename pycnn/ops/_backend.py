"""The one idiom of the compiled backends (cpp and cuda).

A backend is a module with ``load()``, which makes a ``Backend`` and registers, for each op
it runs, a pair ``forward(ctx, *inputs, **params)`` / ``backward(ctx, grad)`` built by a
factory ``make(bindings, ...)`` (closures over the extension or the kernel modules):

  * the elementwise family (every op whose spec has ``elementwise``: y = f(x, *params), the
    gradient from x) comes from ``Backend.elementwise`` alone: the bindings
    ``<op>_forward(x, y, *params)`` and ``<op>_backward(x, grad, grad_x, *params)`` with the
    params of the spec, so an activation takes one line (none, where its bindings exist);
  * maxout and max pooling (``winner_pair``), average pooling (``shape_map_pair``), dropout
    (``dropout_pair``) and prelu (``prelu_pair``) come from one factory each, given the two
    bindings;
  * the rest (convolutions, batch norm, fancy PCA) have their own factory in the backend.

``prepare`` turns every array a binding reads into the layout it needs (C-contiguous,
aligned, native byte order); outputs are allocated with ``_util.empty`` (NaN-filled under
test).
"""
from __future__ import annotations

from collections.abc import Callable

from pycnn.device import array_module
from pycnn.ops import _util, registry, routing
from pycnn.ops.registry import Algo


def needs_grad(ctx, i: int) -> bool:
    flags = getattr(ctx, "needs_input_grad", None)
    return True if flags is None or i >= len(flags) else bool(flags[i])


def grad_like(grad, x):
    """The incoming gradient in x's dtype."""
    return grad if grad.dtype == x.dtype else grad.astype(x.dtype)


class Backend:
    def __init__(self, name: str, prepare: Callable):
        self.name, self.prepare = name, prepare

    def register(self, op: str, forward: Callable, backward: Callable, algo: Algo = Algo.DEFAULT,
                 refuses: Callable | None = None, rounding: float = 1.0) -> None:
        """Register a pair whose input arrays and incoming gradient pass through ``prepare``
        (params are left alone: running statistics are updated in place)."""
        prepare = self.prepare

        def forward_prepared(ctx, *inputs, **params):
            return forward(ctx, *(prepare(a) for a in inputs), **params)

        def backward_prepared(ctx, grad):
            return backward(ctx, prepare(grad))
        registry.get(op).register(self.name, forward_prepared, backward_prepared, algo=algo, refuses=refuses,
                                  rounding=rounding)

    def elementwise(self, bindings) -> None:
        """Register every elementwise op whose two bindings ``bindings`` has."""
        for op in registry.all_ops():
            forward = getattr(bindings, f"{op.name}_forward", None)
            backward = getattr(bindings, f"{op.name}_backward", None)
            if op.elementwise is not None and forward is not None and backward is not None:
                self.register(op.name, *elementwise_pair(op.elementwise, forward, backward))

    def portable(self) -> None:
        """The reference of every portable op, as this backend's 'reference' algorithm (its
        inputs prepared like every other implementation's, so results do not depend on the
        layout of the arrays)."""
        for op in registry.all_ops():
            if op.portable:
                self.register(op.name, op.reference.forward, op.reference.backward, algo=Algo.REFERENCE)


def elementwise_pair(spec_params, forward_kernel, backward_kernel):
    """forward/backward of y = f(x, *params) through the two bindings; ``spec_params`` are
    the spec's (name, default, type)."""
    def forward(ctx, x, **params):
        values = tuple(kind(params.get(name, default)) for name, default, kind in spec_params)
        y = _util.empty_like(x)
        forward_kernel(x, y, *values)
        ctx.save_for_backward(x)
        ctx.values = values
        return y

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = _util.empty_like(x)
        backward_kernel(x, grad_like(grad, x), grad_x, *ctx.values)
        return (grad_x,)
    return forward, backward


# ------------------------------------------------- the other families, one factory each

def winner_pair(forward_kernel, backward_kernel, winner_dtype, out_shape: Callable, args: Callable = lambda **p: ()):
    """y = the max of each group of x, the winner's index kept for backward (maxout, max
    pooling): ``forward_kernel(x, y, winner, *args)``, ``backward_kernel(grad, winner,
    grad_x, *args)``; ``out_shape(x_shape, **params)``, ``args(**params)``."""
    def forward(ctx, x, **params):
        shape = out_shape(x.shape, **params)
        y = _util.empty(shape, x.dtype, x)
        winner = array_module(x).empty(shape, dtype=winner_dtype)  # fully written by the kernel
        ctx.args = args(**params)
        forward_kernel(x, y, winner, *ctx.args)
        ctx.save_for_backward(winner)
        ctx.x_shape, ctx.dtype = x.shape, x.dtype
        return y

    def backward(ctx, grad):
        (winner,) = ctx.saved_tensors
        grad_x = _util.empty(ctx.x_shape, ctx.dtype, grad)
        backward_kernel(grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype), winner, grad_x, *ctx.args)
        return (grad_x,)
    return forward, backward


def shape_map_pair(forward_kernel, backward_kernel, out_shape: Callable):
    """A linear map to another shape (average pooling): ``forward_kernel(x, y)``,
    ``backward_kernel(grad, grad_x)``."""
    def forward(ctx, x):
        y = _util.empty(out_shape(x.shape), x.dtype, x)
        forward_kernel(x, y)
        ctx.x_shape, ctx.dtype = x.shape, x.dtype
        return y

    def backward(ctx, grad):
        grad_x = _util.empty(ctx.x_shape, ctx.dtype, grad)
        backward_kernel(grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype), grad_x)
        return (grad_x,)
    return forward, backward


def dropout_pair(forward_kernel, backward_kernel):
    """Inverted dropout whose mask is drawn again in backward from (p, seed), never stored:
    ``forward_kernel(x, y, p, seed)``, ``backward_kernel(grad, grad_x, p, seed)``."""
    def forward(ctx, x, p=0.5, training=True, seed=0):
        if not training or p == 0:  # the identity, as the reference
            ctx.mask = None
            return x
        y = _util.empty_like(x)
        ctx.mask, ctx.dtype = (float(p), int(seed)), x.dtype
        forward_kernel(x, y, *ctx.mask)
        return y

    def backward(ctx, grad):
        if ctx.mask is None:
            return (grad,)
        grad = grad if grad.dtype == ctx.dtype else grad.astype(ctx.dtype)
        grad_x = _util.empty_like(grad)
        backward_kernel(grad, grad_x, *ctx.mask)
        return (grad_x,)
    return forward, backward


def prelu_pair(forward_kernel, backward_kernel, skips_none: bool = False):
    """x (N, C, ...), weight (C,): ``forward_kernel(x, weight, y)``, ``backward_kernel(x,
    weight, grad, grad_x, grad_weight)`` (grad_weight overwritten, not accumulated;
    ``skips_none``: the kernel takes None for a gradient not wanted)."""
    def forward(ctx, x, weight):
        y = _util.empty_like(x)
        forward_kernel(x, weight, y)
        ctx.save_for_backward(x, weight)
        return y

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _util.empty_like(x) if needs_grad(ctx, 0) or not skips_none else None
        grad_weight = _util.empty_like(weight) if needs_grad(ctx, 1) or not skips_none else None
        backward_kernel(x, weight, grad_like(grad, x), grad_x, grad_weight)
        return (grad_x if needs_grad(ctx, 0) else None, grad_weight if needs_grad(ctx, 1) else None)
    return forward, backward


# ------------------------------------------------- a fused op as the chain it replaces

def chain_pair(fused: str) -> tuple[Callable, Callable]:
    """A fused op run as the ops it replaces, each on the route it would take by itself: for
    a backend without a fused kernel, so that a planned fusion never runs slower than the
    separate calls (registered as the algorithm 'chain', which the profiler then shows)."""
    return registry.chain_pair(fused, lambda op, inputs, params: routing.route(op, inputs, params).impl)
