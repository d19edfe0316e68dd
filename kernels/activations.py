"""Activations, the rules of ``pycnn.ops.activations``, as one pair of scalar device
functions each (mirroring the C++ functors of csrc/activation.hpp), from which every kernel
that applies an activation is built: the element-wise maps here, prelu and rrelu, and the
fused epilogues of conv3x3_act (conv_gemm, conv_igemm) and batchnorm_act (batchnorm).

    value(z, a)     y = act(z)
    grad(s, g, a)   g * act'(z), s the saved pre-activation z; for the rectifiers whose
                    output has the sign of z, s may be y = act(z) as well (the same result)
    weight_grad(s, g)   the per-channel activation's (prelu's) term of its slope's gradient

``a`` is the activation's one scalar parameter (``Activation.scalar``: leaky_relu's slope,
elu's alpha; prelu's slope of the element's channel), unused by the others.  The rectifiers
take their negative branch at z == 0 and for NaN, as the references' ``where(z > 0, ...)``
does (relu keeps a NaN, as maximum(NaN, 0) is NaN).  Kernels are compiled per activation
and dtype, the activation's functions inlined by the compiler: no codes, no branches on it.

Element-wise kernels work on flat (size,) views of C-contiguous arrays, one thread per
element.  Scalars (slopes, alpha) arrive as NumPy scalars of the array's dtype, so float32
kernels compute in float32 throughout.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from numba import cuda

from . import reduce
from ._launch import config_1d, kernel_named, launch, live_args, numba_type, per_dtype
from .pool import wins
from .rng import UNIFORM_SCALE, host_key, random_bits24

# ------------------------------------------------------------ the device-function pairs

def _identity(T):
    """No activation (conv3x3, batchnorm): y = z."""
    @cuda.jit(device=True)
    def value(z, a):
        return z

    @cuda.jit(device=True)
    def grad(s, g, a):
        return g
    return value, grad


def _relu(T):
    @cuda.jit(device=True)
    def value(z, a):
        return T(0) if z <= T(0) else z  # NaN stays NaN, as maximum(z, 0)

    @cuda.jit(device=True)
    def grad(s, g, a):
        return g if s > T(0) else T(0)
    return value, grad


def _leaky(T):
    """leaky_relu (a: its slope), prelu (a: the channel's slope), rrelu (a: the element's)."""
    @cuda.jit(device=True)
    def value(z, a):
        return z if z > T(0) else z * a

    @cuda.jit(device=True)
    def grad(s, g, a):
        return g if s > T(0) else g * a
    return value, grad


def _elu(T):
    @cuda.jit(device=True)
    def value(z, a):
        return z if z > T(0) else a * T(math.expm1(z))

    @cuda.jit(device=True)
    def grad(s, g, a):
        # alpha * exp(z) from z: read off y as y + alpha it cancels for z << 0
        return g if s > T(0) else g * a * T(math.exp(s))
    return value, grad


# sigmoid, tanh and swish through e = exp(-|z|) (never overflows, keeps the relative accuracy
# of tiny outputs); their gradients read z: y(1 - y) and 1 - y^2 from the output are 0
# wherever y rounds to 1, while e / (1 + e)^2 is not.

def _sigmoid(T):
    @cuda.jit(device=True)
    def value(z, a):
        e = T(math.exp(-abs(z)))
        return (T(1) if z >= T(0) else e) / (T(1) + e)

    @cuda.jit(device=True)
    def grad(s, g, a):
        e = T(math.exp(-abs(s)))
        r = T(1) / (T(1) + e)
        return g * (e * r * r)
    return value, grad


def _tanh(T):
    @cuda.jit(device=True)
    def value(z, a):
        return T(math.tanh(z))

    @cuda.jit(device=True)
    def grad(s, g, a):
        # 1 - tanh(z)^2 = 4 e / (1 + e)^2 with e = exp(-2|z|)
        e = T(math.exp(T(-2) * abs(s)))
        r = T(1) / (T(1) + e)
        return g * (T(4) * e * r * r)
    return value, grad


def _swish(T):
    """swish (SiLU): y = z sigmoid(z); y(-inf) = 0 (not -inf * 0); the gradient
    sigmoid(z) + z e / (1 + e)^2, its second term 0 where e is (z = +-inf or huge)."""
    @cuda.jit(device=True)
    def value(z, a):
        e = T(math.exp(-abs(z)))
        return T(0) if z == -math.inf else z * ((T(1) if z >= T(0) else e) / (T(1) + e))

    @cuda.jit(device=True)
    def grad(s, g, a):
        e = T(math.exp(-abs(s)))
        r = T(1) / (T(1) + e)
        return g * ((T(1) if s >= T(0) else e) * r + (s * e * r * r if e > T(0) else T(0)))
    return value, grad


class Spec(NamedTuple):
    pair: object               # T -> (value, grad)
    scalar: str | None = None  # the op's parameter that ``a`` is: "slope", "alpha", or None
    per_channel: bool = False  # prelu: ``a`` is the slope of the element's channel (an input)


# The activations by their op names (None: none).  rrelu is leaky_relu's pair with a slope
# drawn per element (its own kernels below).
SPECS = {None: Spec(_identity), "relu": Spec(_relu), "leaky_relu": Spec(_leaky, "slope"),
         "prelu": Spec(_leaky, per_channel=True), "elu": Spec(_elu, "alpha"), "sigmoid": Spec(_sigmoid),
         "tanh": Spec(_tanh), "swish": Spec(_swish)}
# the element-wise maps y = act(x, a) of the ops with these names (prelu takes a weight input)
MAPS = tuple(name for name, spec in SPECS.items() if name is not None and not spec.per_channel)


class Activation(NamedTuple):
    value: object        # device function (z, a) -> y
    grad: object         # device function (s, g, a) -> g * act'(z)
    weight_grad: object  # device function (s, g) -> the term of the per-channel slope's gradient
    per_channel: bool


@functools.cache
def _weight_grad(T):
    @cuda.jit(device=True)
    def weight_grad(s, g):
        # d(s * a) / da * g where s <= 0 (s the pre-activation, or y = a z where every a > 0)
        return T(0) if s > T(0) else g * s
    return weight_grad


@functools.cache
def _pair(builder, T):
    return builder(T)


def activation(name, T) -> Activation:
    """The device functions of activation ``name`` (None: the identity) for numba type ``T``."""
    try:
        spec = SPECS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {list(SPECS)}, got {name!r}") from None
    value, grad = _pair(spec.pair, T)
    return Activation(value, grad, _weight_grad(T), spec.per_channel)


def scalar(name, dtype, slope=0.01, alpha=1.0):
    """``a`` of activation ``name`` given a fused op's params (0 where it takes none)."""
    return np.dtype(dtype).type({"slope": slope, "alpha": alpha}.get(SPECS[name].scalar, 0))


def check_slopes(name, slopes, what: str) -> None:
    """prelu takes one slope per channel (``slopes``), and only prelu does."""
    if SPECS[name].per_channel != (slopes is not None):
        raise ValueError(f"{what}: prelu_weight (C,) is needed for activation 'prelu', and only for it")


# --------------------------------------------------------------------- the map kernels

@per_dtype
def _map_kernels(T, name):
    act = activation(name, T)
    value, grad = act.value, act.grad

    @kernel_named(f"{name}_forward")
    def forward(x, y, a):
        # x and y are (size,)
        i = cuda.grid(1)
        if i < x.size:
            y[i] = value(x[i], a)

    @kernel_named(f"{name}_backward")
    def backward(x, grad_y, grad_x, a):
        # x, grad_y and grad_x are (size,): grad_x = grad_y * act'(x)
        i = cuda.grid(1)
        if i < x.size:
            grad_x[i] = grad(x[i], grad_y[i], a)
    return forward, backward


@per_dtype
def _build(T):
    act = activation("prelu", T)
    value, grad = act.value, act.grad
    leaky_value, leaky_grad = activation("leaky_relu", T)[:2]

    # ---------------------------------------------------------------------------- prelu
    @cuda.jit
    def prelu_forward(x, weight, y):
        # x and y are (N, C, P) (P: the product of the spatial sizes), weight is (C,)
        n_, channels, inner = x.shape
        i = cuda.grid(1)
        if i < x.size:
            n, c, p = i // (channels * inner), (i // inner) % channels, i % inner
            y[n, c, p] = value(x[n, c, p], weight[c])

    @cuda.jit
    def prelu_backward_input(x, weight, grad_y, grad_x):
        # x, grad_y, grad_x are (N, C, P), weight is (C,)
        n_, channels, inner = x.shape
        i = cuda.grid(1)
        if i < x.size:
            n, c, p = i // (channels * inner), (i // inner) % channels, i % inner
            grad_x[n, c, p] = grad(x[n, c, p], grad_y[n, c, p], weight[c])

    # ---------------------------------------------------------------------------- rrelu
    @cuda.jit(device=True)
    def rrelu_slope(i, key, keys, key_index, lower, span, training, eval_slope):
        """Element i's slope: 1 / (lower + span * u_i) in training, else the fixed one; the
        stream key is keys[key_index] when key_index >= 0 (a captured step), else key."""
        if not training:
            return eval_slope
        k = keys[key_index] if key_index >= 0 else key
        u = T(random_bits24(k, i)) * T(UNIFORM_SCALE)
        return T(1) / (lower + span * u)

    @cuda.jit
    def rrelu_forward(x, y, key, keys, key_index, lower, span, training, eval_slope):
        i = cuda.grid(1)
        if i < x.size:
            y[i] = leaky_value(x[i], rrelu_slope(i, key, keys, key_index, lower, span, training, eval_slope))

    @cuda.jit
    def rrelu_backward(x, grad_y, grad_x, key, keys, key_index, lower, span, training, eval_slope):
        # the slopes are drawn again from the seed instead of being stored by forward
        i = cuda.grid(1)
        if i < x.size:
            slope = rrelu_slope(i, key, keys, key_index, lower, span, training, eval_slope)
            grad_x[i] = leaky_grad(x[i], grad_y[i], slope)

    # --------------------------------------------------------------------------- maxout
    @cuda.jit
    def maxout_forward(x, y, winner):
        # x is (N, C*k, P), y and winner (int32, 0..k-1) are (N, C, P): y[n, j, p] is the max
        # over the k consecutive channels j*k .. j*k + k - 1 (first max wins, NaN wins)
        n_, channels, inner = y.shape
        pieces = x.shape[1] // channels
        o = cuda.grid(1)
        if o < y.size:
            n, j, p = o // (channels * inner), (o // inner) % channels, o % inner
            best, index = x[n, j * pieces, p], 0
            for t in range(1, pieces):
                v = x[n, j * pieces + t, p]
                if wins(v, best):
                    best, index = v, t
            y[n, j, p] = best
            winner[n, j, p] = index

    @cuda.jit
    def maxout_backward(grad, winner, grad_x):
        # grad and winner are (N, C, P), grad_x is (N, C*k, P): one thread per input element
        n_, channels_in, inner = grad_x.shape
        pieces = channels_in // grad.shape[1]
        i = cuda.grid(1)
        if i < grad_x.size:
            n, ch, p = i // (channels_in * inner), (i // inner) % channels_in, i % inner
            j, t = ch // pieces, ch % pieces
            grad_x[n, ch, p] = grad[n, j, p] if winner[n, j, p] == t else T(0)

    return SimpleNamespace(prelu_forward=prelu_forward, prelu_backward_input=prelu_backward_input,
                           rrelu_forward=rrelu_forward,
                           rrelu_backward=rrelu_backward, maxout_forward=maxout_forward,
                           maxout_backward=maxout_backward)


def _flat(a):
    return a.reshape(-1)


def _map(kernel, like, *arrays_and_scalars) -> None:
    """One thread per element of ``like``; arrays are passed as flat views."""
    args = tuple(_flat(a) if hasattr(a, "shape") and a.ndim > 0 else a for a in arrays_and_scalars)
    grid, block = config_1d(like.size)
    launch(kernel, grid, block, like, *args)


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


# ----------------------------------------------------------------------------- public API
# Every array is C-contiguous; outputs are preallocated by the caller.

def _map_scalar(name, x, params):
    """``a`` of the map ``name`` from the params of its binding (its spec's one scalar, or none)."""
    wanted = SPECS[name].scalar is not None
    if len(params) != wanted:
        raise TypeError(f"{name} takes {int(wanted)} scalar parameter(s), got {len(params)}")
    return _scalar(params[0] if wanted else 0, x.dtype)


def map_forward(name, x, y, *params) -> None:
    """y = act(x, *params) for the map ``name`` of ``MAPS`` (its spec's params: leaky_relu's
    slope, elu's alpha; none for the others)."""
    _map(_map_kernels(x.dtype, name)[0], x, x, y, _map_scalar(name, x, params))


def map_backward(name, x, grad, grad_x, *params) -> None:
    """grad_x = grad * act'(x) for the map ``name``."""
    _map(_map_kernels(x.dtype, name)[1], x, x, grad, grad_x, _map_scalar(name, x, params))


def _channels(a):
    """(N, C, ...) -> (N, C, P)."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def prelu_forward(x, weight, y):
    grid, block = config_1d(x.size)
    launch(_build(x.dtype).prelu_forward, grid, block, x, _channels(x), weight, _channels(y))


def prelu_backward(x, weight, grad, grad_x=None, grad_weight=None):
    """grad_x and / or grad_weight (each None when not wanted)."""
    kernels = _build(x.dtype)
    x3, g3 = _channels(x), _channels(grad)
    if grad_x is not None:
        grid, block = config_1d(x.size)
        launch(kernels.prelu_backward_input, grid, block, x, x3, weight, g3, _channels(grad_x))
    if grad_weight is not None:  # sum over (n, p) of the terms grad * x where x <= 0
        reduce.channel_sum(x3, grad_weight, g3, _weight_grad(numba_type(x.dtype)))


def _rrelu_args(x, lower, upper, seed, training, live_key):
    s = lambda v: _scalar(v, x.dtype)  # noqa: E731
    keys, key_index = live_args(live_key if training else None, x, np.uint64)
    return (host_key(seed if training else 0), keys, key_index, s(lower), s(upper - lower), bool(training),
            s(2.0 / (lower + upper)))


def rrelu_forward(x, y, lower, upper, seed, training, live_key=None):
    """The arguments in the order of the C++ binding (pycnn/ops/_backend.py); ``live_key``:
    (table, index) of a stream key read on the device instead of seed's (pycnn.cuda_graph)."""
    _map(_build(x.dtype).rrelu_forward, x, x, y, *_rrelu_args(x, lower, upper, seed, training, live_key))


def rrelu_backward(x, grad, grad_x, lower, upper, seed, training, live_key=None):
    _map(_build(x.dtype).rrelu_backward, x, x, grad, grad_x, *_rrelu_args(x, lower, upper, seed, training, live_key))


def maxout_forward(x, y, winner):
    """x is (N, C*k, ...), y and winner (int32) are (N, C, ...)."""
    grid, block = config_1d(y.size)
    launch(_build(x.dtype).maxout_forward, grid, block, x, _channels(x), _channels(y), _channels(winner))


def maxout_backward(grad, winner, grad_x):
    grid, block = config_1d(grad_x.size)
    launch(_build(grad.dtype).maxout_backward, grid, block, grad, _channels(grad), _channels(winner),
           _channels(grad_x))
