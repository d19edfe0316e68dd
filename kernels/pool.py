"""2x2 pooling with stride 2, the rules of ``pycnn.ops.pool``:

* x is (N, C, H, W), y is (N, C, H // 2, W // 2); an odd last row / column is not pooled and
  gets a zero gradient;
* max: the first maximum of the window in row-major order wins (top-left, top-right,
  bottom-left, bottom-right) and gets the whole gradient; a NaN wins over any number.

Forward: one thread per output element.  Backward: one thread per input element, so every
element of the gradient is written exactly once (no atomics, no zero-fill pass).
"""
from __future__ import annotations

from types import SimpleNamespace

from numba import cuda

from ._launch import config_1d, launch, per_dtype


@cuda.jit(device=True)
def wins(candidate, best):
    """True when ``candidate`` replaces ``best`` as the window maximum (first max, NaN wins)."""
    return best == best and (candidate > best or candidate != candidate)


@cuda.jit(device=True)
def window(o, y):
    """(plane, top row, left column) in x of the 2x2 window of element o of y (N*C, Ho, Wo),
    or plane -1 past its end."""
    ho, wo = y.shape[1], y.shape[2]
    if o >= y.shape[0] * ho * wo:
        return -1, 0, 0
    r = o % (ho * wo)
    return o // (ho * wo), 2 * (r // wo), 2 * (r % wo)


@cuda.jit(device=True)
def source(i, grad_x, grad):
    """(plane, row, column) of element i of grad_x (N*C, H, W), or plane -1 past its end, and
    whether it lies in a pooled window (an odd last row / column does not)."""
    h_, w_ = grad_x.shape[1], grad_x.shape[2]
    if i >= grad_x.shape[0] * h_ * w_:
        return -1, 0, 0, False
    r = i % (h_ * w_)
    h, w = r // w_, r % w_
    return i // (h_ * w_), h, w, h < 2 * grad.shape[1] and w < 2 * grad.shape[2]


@per_dtype
def _build(T):
    @cuda.jit
    def maxpool_forward(x, y, winner):
        # x is (N*C, H, W), y and winner (int8, 0..3) are (N*C, Ho, Wo)
        p, h, w = window(cuda.grid(1), y)
        if p >= 0:
            best, index = x[p, h, w], 0
            for t in range(1, 4):
                v = x[p, h + t // 2, w + t % 2]
                if wins(v, best):
                    best, index = v, t
            y[p, h // 2, w // 2] = best
            winner[p, h // 2, w // 2] = index

    @cuda.jit
    def maxpool_backward(grad, winner, grad_x):
        # grad and winner are (N*C, Ho, Wo), grad_x is (N*C, H, W)
        p, h, w, pooled = source(cuda.grid(1), grad_x, grad)
        if p >= 0:
            won = pooled and winner[p, h // 2, w // 2] == (h % 2) * 2 + w % 2
            grad_x[p, h, w] = grad[p, h // 2, w // 2] if won else T(0)

    @cuda.jit
    def avgpool_forward(x, y):
        # x is (N*C, H, W), y is (N*C, Ho, Wo): the window mean, summed in row-major order
        p, h, w = window(cuda.grid(1), y)
        if p >= 0:
            total = ((x[p, h, w] + x[p, h, w + 1]) + x[p, h + 1, w]) + x[p, h + 1, w + 1]
            y[p, h // 2, w // 2] = total * T(0.25)

    @cuda.jit
    def avgpool_backward(grad, grad_x):
        # grad is (N*C, Ho, Wo), grad_x is (N*C, H, W): a quarter of the gradient to each tap
        p, h, w, pooled = source(cuda.grid(1), grad_x, grad)
        if p >= 0:
            grad_x[p, h, w] = grad[p, h // 2, w // 2] * T(0.25) if pooled else T(0)

    return SimpleNamespace(maxpool_forward=maxpool_forward, maxpool_backward=maxpool_backward,
                           avgpool_forward=avgpool_forward, avgpool_backward=avgpool_backward)


def _planes(a):
    """(N, C, H, W) -> (N*C, H, W), a view of a C-contiguous array."""
    n, c, h, w = a.shape
    return a.reshape(n * c, h, w)


def maxpool2x2_forward(x, y, winner) -> None:
    """y = 2x2 max of x; winner (int8, shaped like y) = the window position that won."""
    grid, block = config_1d(y.size)
    launch(_build(x.dtype).maxpool_forward, grid, block, x, _planes(x), _planes(y), _planes(winner))


def maxpool2x2_backward(grad, winner, grad_x) -> None:
    grid, block = config_1d(grad_x.size)
    launch(_build(grad.dtype).maxpool_backward, grid, block, grad, _planes(grad), _planes(winner), _planes(grad_x))


def avgpool2x2_forward(x, y) -> None:
    grid, block = config_1d(y.size)
    launch(_build(x.dtype).avgpool_forward, grid, block, x, _planes(x), _planes(y))


def avgpool2x2_backward(grad, grad_x) -> None:
    grid, block = config_1d(grad_x.size)
    launch(_build(grad.dtype).avgpool_backward, grid, block, grad, _planes(grad), _planes(grad_x))
