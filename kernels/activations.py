"""Activations, the rules of ``pycnn.ops.activations``: the rectifiers take their negative
branch at x == 0 (and for NaN), as the references' ``where(x > 0, ...)`` does.

Element-wise kernels work on flat (size,) views of C-contiguous arrays, one thread per
element.  Scalars (slopes, alpha) arrive as NumPy scalars of the array's dtype, so float32
kernels compute in float32 throughout.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from . import reduce
from .reduce import REDUCE_THREADS
from ._launch import config_1d, launch, live_args, per_dtype
from .pool import wins
from .rng import UNIFORM_SCALE, host_key, random_bits24


@per_dtype
def _build(T):
    # ------------------------------------------------------------------ relu, leaky_relu
    @cuda.jit
    def relu_forward(x, y):
        i = cuda.grid(1)
        if i < x.size:
            v = x[i]
            y[i] = T(0) if v <= T(0) else v  # NaN passes through, as maximum(x, 0)

    @cuda.jit
    def relu_backward(x, grad, grad_x):
        i = cuda.grid(1)
        if i < x.size:
            grad_x[i] = grad[i] if x[i] > T(0) else T(0)

    @cuda.jit
    def leaky_forward(x, y, slope):
        i = cuda.grid(1)
        if i < x.size:
            v = x[i]
            y[i] = v if v > T(0) else v * slope

    @cuda.jit
    def leaky_backward(x, grad, grad_x, slope):
        i = cuda.grid(1)
        if i < x.size:
            grad_x[i] = grad[i] if x[i] > T(0) else grad[i] * slope

    # ---------------------------------------------------------------------------- prelu
    @cuda.jit
    def prelu_forward(x, weight, y):
        # x and y are (N, C, P) (P: the product of the spatial sizes), weight is (C,)
        n_, channels, inner = x.shape
        i = cuda.grid(1)
        if i < x.size:
            n, c, p = i // (channels * inner), (i // inner) % channels, i % inner
            v = x[n, c, p]
            y[n, c, p] = v if v > T(0) else v * weight[c]

    @cuda.jit
    def prelu_backward_input(x, weight, grad, grad_x):
        # x, grad, grad_x are (N, C, P), weight is (C,)
        n_, channels, inner = x.shape
        i = cuda.grid(1)
        if i < x.size:
            n, c, p = i // (channels * inner), (i // inner) % channels, i % inner
            g = grad[n, c, p]
            grad_x[n, c, p] = g if x[n, c, p] > T(0) else g * weight[c]

    @cuda.jit
    def prelu_backward_weight(x, grad, grad_weight):
        # x and grad are (N, C, P), grad_weight is (C,) and zeroed:
        #   grad_weight[c] += sum over (n, p) with x <= 0 of grad * x
        # grid (blocks per channel, C); each block tree-reduces its share, then one atomic
        partial = cuda.shared.array(REDUCE_THREADS, T)
        n_, channels, inner = x.shape
        c = cuda.blockIdx.y
        acc = T(0)
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while e < n_ * inner:
            n, p = e // inner, e % inner
            v = x[n, c, p]
            if not v > T(0):
                acc += grad[n, c, p] * v
            e += cuda.gridDim.x * cuda.blockDim.x
        total = reduce.block_sum(partial, acc)
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(grad_weight, c, total)

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
            v = x[i]
            y[i] = v if v > T(0) else v * rrelu_slope(i, key, keys, key_index, lower, span, training, eval_slope)

    @cuda.jit
    def rrelu_backward(x, grad, grad_x, key, keys, key_index, lower, span, training, eval_slope):
        # the slopes are drawn again from the seed instead of being stored by forward
        i = cuda.grid(1)
        if i < x.size:
            g = grad[i]
            grad_x[i] = g if x[i] > T(0) else g * rrelu_slope(i, key, keys, key_index, lower, span, training,
                                                                eval_slope)

    # ------------------------------------------------------------------------------ elu
    @cuda.jit
    def elu_forward(x, y, alpha):
        i = cuda.grid(1)
        if i < x.size:
            v = x[i]
            y[i] = v if v > T(0) else alpha * T(math.expm1(v))

    @cuda.jit
    def elu_backward(x, grad, grad_x, alpha):
        i = cuda.grid(1)
        if i < x.size:
            v = x[i]
            grad_x[i] = grad[i] if v > T(0) else grad[i] * alpha * T(math.exp(v))

    # --------------------------------------------------------------------- sigmoid, tanh
    # sigmoid and tanh through e = exp(-|x|) (never overflows, keeps the relative accuracy
    # of tiny outputs); their backward passes read x: y(1 - y) and 1 - y^2 from the output
    # are 0 wherever y rounds to 1, while e/(1 + e)^2 and 4e'/(1 + e')^2 are not.
    @cuda.jit(device=True)
    def logistic(v):
        """(sigmoid(v), e = exp(-|v|), r = 1 / (1 + e)): sigmoid'(v) = e r^2 for either sign."""
        e = T(math.exp(-abs(v)))
        r = T(1) / (T(1) + e)
        return (T(1) if v >= T(0) else e) * r, e, r

    @cuda.jit
    def sigmoid_forward(x, y):
        i = cuda.grid(1)
        if i < x.size:
            y[i] = logistic(x[i])[0]

    @cuda.jit
    def sigmoid_backward(x, grad, grad_x):
        i = cuda.grid(1)
        if i < x.size:
            _, e, r = logistic(x[i])
            grad_x[i] = grad[i] * (e * r * r)

    # ------------------------------------------------------------------- swish (SiLU)
    # y = x * sigmoid(x) through e = exp(-|x|); y(-inf) = 0 (not -inf * 0); the gradient
    # s + x e / (1 + e)^2 from x, its second term 0 where e is (x = +-inf or huge)
    @cuda.jit
    def swish_forward(x, y):
        i = cuda.grid(1)
        if i < x.size:
            v = x[i]
            y[i] = T(0) if v == -math.inf else v * logistic(v)[0]

    @cuda.jit
    def swish_backward(x, grad, grad_x):
        i = cuda.grid(1)
        if i < x.size:
            v = x[i]
            s, e, r = logistic(v)
            grad_x[i] = grad[i] * (s + (v * e * r * r if e > T(0) else T(0)))

    @cuda.jit
    def tanh_forward(x, y):
        i = cuda.grid(1)
        if i < x.size:
            y[i] = T(math.tanh(x[i]))

    @cuda.jit
    def tanh_backward(x, grad, grad_x):
        i = cuda.grid(1)
        if i < x.size:
            e = T(math.exp(T(-2) * abs(x[i])))
            s = T(1) / (T(1) + e)
            grad_x[i] = grad[i] * (T(4) * e * s * s)

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

    return SimpleNamespace(**{name: f for name, f in locals().items() if name not in ("T", "logistic")})


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

def relu_forward(x, y):
    _map(_build(x.dtype).relu_forward, x, x, y)


def relu_backward(x, grad, grad_x):
    _map(_build(x.dtype).relu_backward, x, x, grad, grad_x)


def leaky_relu_forward(x, y, slope):
    _map(_build(x.dtype).leaky_forward, x, x, y, _scalar(slope, x.dtype))


def leaky_relu_backward(x, grad, grad_x, slope):
    _map(_build(x.dtype).leaky_backward, x, x, grad, grad_x, _scalar(slope, x.dtype))


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
    if grad_weight is not None:
        reduce.zero(grad_weight)
        grid = (reduce.reduce_blocks(x3.shape[0] * x3.shape[2]), x3.shape[1])
        launch(kernels.prelu_backward_weight, grid, (reduce.REDUCE_THREADS,), x, x3, g3, grad_weight)


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


def elu_forward(x, y, alpha):
    _map(_build(x.dtype).elu_forward, x, x, y, _scalar(alpha, x.dtype))


def elu_backward(x, grad, grad_x, alpha):
    _map(_build(x.dtype).elu_backward, x, x, grad, grad_x, _scalar(alpha, x.dtype))


def sigmoid_forward(x, y):
    _map(_build(x.dtype).sigmoid_forward, x, x, y)


def sigmoid_backward(x, grad, grad_x):
    _map(_build(x.dtype).sigmoid_backward, x, x, grad, grad_x)


def swish_forward(x, y):
    _map(_build(x.dtype).swish_forward, x, x, y)


def swish_backward(x, grad, grad_x):
    _map(_build(x.dtype).swish_backward, x, x, grad, grad_x)


def tanh_forward(x, y):
    _map(_build(x.dtype).tanh_forward, x, x, y)


def tanh_backward(x, grad, grad_x):
    _map(_build(x.dtype).tanh_backward, x, x, grad, grad_x)


def maxout_forward(x, y, winner):
    """x is (N, C*k, ...), y and winner (int32) are (N, C, ...)."""
    grid, block = config_1d(y.size)
    launch(_build(x.dtype).maxout_forward, grid, block, x, _channels(x), _channels(y), _channels(winner))


def maxout_backward(grad, winner, grad_x):
    grid, block = config_1d(grad_x.size)
    launch(_build(grad.dtype).maxout_backward, grid, block, grad, _channels(grad), _channels(winner),
           _channels(grad_x))
