"""Elementwise arithmetic, reductions and reshapes that layers and losses are built from.

Binary ops broadcast like NumPy; their backward sums the gradient back to each operand's
shape (``unbroadcast``).
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
from pycnn.device import array_module
from pycnn.ops.registry import Sample, declare


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes along which an operand of ``shape`` was broadcast."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def _check_binary(a, b):
    for name, operand in (("a", a), ("b", b)):
        if operand is None:
            raise TypeError(f"{name} must be a Tensor, an array or a number, got None")
    _util.check_float_arrays(a=a, b=b)
    try:
        np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    except ValueError:
        raise ValueError(f"operands cannot be broadcast together: a {tuple(a.shape)}, b {tuple(b.shape)}") from None


def _binary_samples(rng, dtype, positive_b=False):
    def draw(shape):
        v = rng.standard_normal(shape)
        return np.asarray(np.abs(v) + 0.5 if positive_b else v, dtype=dtype)
    return [Sample((rng.standard_normal((2, 3, 4)).astype(dtype), draw((2, 3, 4)))),
            Sample((rng.standard_normal((2, 3, 4)).astype(dtype), draw((3, 1)))),
            Sample((rng.standard_normal((1, 5)).astype(dtype), draw((4, 1)))),
            Sample((rng.standard_normal((3,)).astype(dtype), draw(())))]


def _map_flops(*shapes, **params):
    return int(np.prod(np.broadcast_shapes(*[s for s in shapes if s is not None])))


def _map_bytes(*shapes, itemsize=4, **params):
    shapes = [s for s in shapes if s is not None]
    out = int(np.prod(np.broadcast_shapes(*shapes)))
    return itemsize * (out + sum(int(np.prod(s)) for s in shapes))


def _declare_binary(name, forward, grads, torch, positive_b=False):
    """A broadcasting binary op; ``grads(a, b, grad)`` gives the unreduced (grad_a, grad_b)."""
    def fwd(ctx, a, b):
        ctx.save_for_backward(a, b)
        return forward(a, b)

    def bwd(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = grads(a, b, grad)
        return (unbroadcast(grad_a, a.shape) if ctx.needs_input_grad[0] else None,
                unbroadcast(grad_b, b.shape) if ctx.needs_input_grad[1] else None)

    declare(name, forward=fwd, backward=bwd, check=_check_binary, flops=_map_flops, bytes=_map_bytes,
            samples=lambda rng, dtype: _binary_samples(rng, dtype, positive_b), torch=torch, portable=True)


_declare_binary("add", lambda a, b: a + b, lambda a, b, g: (g, g), torch=lambda a, b: a + b)
_declare_binary("sub", lambda a, b: a - b, lambda a, b, g: (g, -g), torch=lambda a, b: a - b)
_declare_binary("mul", lambda a, b: a * b, lambda a, b, g: (g * b, g * a), torch=lambda a, b: a * b)
# d(a/b)/db = -(a / b) / b: -a / (b * b) overflows (b * b underflows) long before the quotient does
_declare_binary("div", lambda a, b: a / b, lambda a, b, g: (g / b, -g * (a / b) / b), torch=lambda a, b: a / b,
                positive_b=True)


# ------------------------------------------------------------------------------ unary maps

def _check_unary(x, **params):
    _util.check_float("x", x)


def _declare_unary(name, forward, derivative, samples, torch, check=_check_unary):
    """An elementwise map; ``derivative(x, y, **params)`` is dy/dx."""
    def fwd(ctx, x, **params):
        y = forward(x, **params)
        ctx.save_for_backward(x, y)
        ctx.params = params
        return y

    def bwd(ctx, grad):
        x, y = ctx.saved_tensors
        return (grad * derivative(x, y, **ctx.params),)

    declare(name, forward=fwd, backward=bwd, check=check, flops=_map_flops, bytes=_map_bytes, samples=samples,
            torch=torch, portable=True)


def _positive_samples(rng, dtype):
    return [Sample(((np.abs(rng.standard_normal((3, 4))) + 0.2).astype(dtype),))]


def _any_samples(rng, dtype):
    v = rng.standard_normal((3, 4))
    return [Sample(((v + 0.1 * np.sign(v)).astype(dtype),))]


def _pow_grad(x, exponent):
    """d x**e / dx = e x**(e-1); 0 for e = 0 (x**0 is 1 everywhere: 0 * 0**-1 would be NaN)."""
    if exponent == 0:
        return array_module(x).zeros_like(x)
    return x.dtype.type(exponent) * x ** x.dtype.type(exponent - 1)


def _check_pow(x, exponent=2.0):
    _check_unary(x)
    _util.check_finite_number("exponent", exponent)


_declare_unary("exp", lambda x: array_module(x).exp(x), lambda x, y: y, _any_samples, torch=lambda x: x.exp())
_declare_unary("log", lambda x: array_module(x).log(x), lambda x, y: 1 / x, _positive_samples, torch=lambda x: x.log())
_declare_unary("abs", lambda x: array_module(x).abs(x), lambda x, y: array_module(x).sign(x), _any_samples,
               torch=lambda x: x.abs())
_declare_unary(
    "pow", lambda x, exponent=2.0: x ** x.dtype.type(exponent),
    lambda x, y, exponent=2.0: _pow_grad(x, exponent),
    lambda rng, dtype: [Sample(s.inputs, {"exponent": e}) for s, e in
                        ((_positive_samples(rng, dtype)[0], 0.5), (_any_samples(rng, dtype)[0], 2.0),
                         (_any_samples(rng, dtype)[0], 3))],
    torch=lambda x, exponent=2.0: x ** exponent, check=_check_pow)


# ---------------------------------------------------------------------------- reductions

def _normalise_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes))


def _check_reduce(x, axis=None, keepdims=False):
    _util.check_float("x", x)
    _normalise_axis(axis, x.ndim)


def _expand_back(grad, x_shape, axis, keepdims):
    """A reduced gradient broadcast back to the input's shape (a fresh, writable array)."""
    xp = array_module(grad)
    if not keepdims:
        for a in _normalise_axis(axis, len(x_shape)):
            grad = xp.expand_dims(grad, a)
    return xp.broadcast_to(grad, x_shape).copy()


def sum_forward(ctx, x, axis=None, keepdims=False):
    ctx.x_shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
    return x.sum(axis=axis, keepdims=keepdims)


def sum_backward(ctx, grad):
    return (_expand_back(grad, ctx.x_shape, ctx.axis, ctx.keepdims),)


def mean_forward(ctx, x, axis=None, keepdims=False):
    ctx.x_shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
    ctx.count = int(np.prod([x.shape[a] for a in _normalise_axis(axis, x.ndim)]))
    return x.mean(axis=axis, keepdims=keepdims)


def mean_backward(ctx, grad):
    return (_expand_back(grad / grad.dtype.type(ctx.count), ctx.x_shape, ctx.axis, ctx.keepdims),)


def _reduce_samples(rng, dtype):
    x = rng.standard_normal((2, 3, 4)).astype(dtype)
    return [Sample((x,)), Sample((x,), {"axis": 1}), Sample((x,), {"axis": (0, 2), "keepdims": True}),
            Sample((x,), {"axis": -1})]


def _reduce_flops(x_shape, **params):
    return int(np.prod(x_shape))


def _reduce_bytes(x_shape, itemsize=4, **params):
    return itemsize * int(np.prod(x_shape))


def _torch_reduce(method):
    def reduce(x, axis=None, keepdims=False):
        dim = tuple(range(x.ndim)) if axis is None else axis
        return getattr(x, method)(dim=dim, keepdim=keepdims)
    return reduce


declare("sum", forward=sum_forward, backward=sum_backward, check=_check_reduce, portable=True,
        flops=_reduce_flops, bytes=_reduce_bytes, samples=_reduce_samples, torch=_torch_reduce("sum"))
declare("mean", forward=mean_forward, backward=mean_backward, check=_check_reduce, portable=True,
        flops=_reduce_flops, bytes=_reduce_bytes, samples=_reduce_samples, torch=_torch_reduce("mean"))


# ------------------------------------------------------------------------------- shapes

def _check_reshape(x, shape=None):
    _util.check_float("x", x)
    if shape is None:
        raise TypeError("shape is required")
    try:
        np.empty(x.shape, dtype=np.bool_).reshape(shape)  # cheap: validates shape and -1
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shape {shape!r} does not fit x of shape {tuple(x.shape)}: {exc}") from None


def reshape_forward(ctx, x, shape=None):
    ctx.x_shape = x.shape
    return x.reshape(shape)


def reshape_backward(ctx, grad):
    return (grad.reshape(ctx.x_shape),)


def flatten_forward(ctx, x):
    """(N, ...) -> (N, product of the rest)."""
    ctx.x_shape = x.shape
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # (-1 cannot be inferred for N = 0)


def _check_flatten(x):
    _util.check_float("x", x)
    _util.check_ndim("x", x, (1, 2, 3, 4, 5, 6))


def _no_cost(*shapes, **params):
    return 0


declare("reshape", forward=reshape_forward, backward=reshape_backward, check=_check_reshape, portable=True,
        flops=_no_cost, bytes=_no_cost, torch=lambda x, shape=None: x.reshape(shape),
        samples=lambda rng, dtype: [Sample((rng.standard_normal((2, 6)).astype(dtype),), {"shape": (3, -1)})])
declare("flatten", forward=flatten_forward, backward=reshape_backward, check=_check_flatten, portable=True,
        flops=_no_cost, bytes=_no_cost, torch=lambda x: x.flatten(1),
        samples=lambda rng, dtype: [Sample((rng.standard_normal((2, 3, 2, 2)).astype(dtype),))])


# ------------------------------------------------------------------------------- matmul

def _check_matmul(a, b):
    for name, m in (("a", a), ("b", b)):
        _util.check_float(name, m)
        _util.check_ndim(name, m, 2)
    _util.check_same_dtype(a=a, b=b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a is {tuple(a.shape)} and b is {tuple(b.shape)}: inner dimensions differ")


def matmul_forward(ctx, a, b):
    ctx.save_for_backward(a, b)
    return a @ b


def matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    return (grad @ b.T if ctx.needs_input_grad[0] else None, a.T @ grad if ctx.needs_input_grad[1] else None)


declare("matmul", forward=matmul_forward, backward=matmul_backward, check=_check_matmul, portable=True,
        torch=lambda a, b: a @ b,
        flops=lambda a, b: 2 * a[0] * a[1] * b[1],
        backward_flops=lambda a, b: 4 * a[0] * a[1] * b[1],  # grad @ b.T and a.T @ grad
        bytes=lambda a, b, itemsize=4: itemsize * (a[0] * a[1] + b[0] * b[1] + a[0] * b[1]),
        samples=lambda rng, dtype: [Sample((rng.standard_normal((3, 4)).astype(dtype),
                                            rng.standard_normal((4, 2)).astype(dtype)))])
