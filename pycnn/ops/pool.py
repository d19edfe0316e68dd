"""2x2 pooling with stride 2 (NumPy references).

Shapes: x is (N, C, H, W), y is (N, C, H // 2, W // 2).
* Odd sizes: the last row (odd H) and the last column (odd W) are not pooled, as with
  PyTorch's default (floor) mode; they receive a zero gradient.
* Ties in max-pooling: the first maximum of the window in row-major order (top-left,
  top-right, bottom-left, bottom-right) wins and receives the whole gradient.  A NaN in a
  window wins over any number, so NaN propagates.
"""
from __future__ import annotations

import pycnn.ops._util as _util
from pycnn.device import array_module
from pycnn.ops.registry import Api, Sample, declare, map_bench


def _check_pool(x):
    _util.check_float("x", x)
    _util.check_ndim("x", x, 4)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must be at least 2x2 in H and W for 2x2 pooling, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")


def windows2x2(x):
    """(N, C, H, W) -> (N, C, H//2, W//2, 4): each 2x2 window in row-major order."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    blocks = x[:, :, :2 * ho, :2 * wo].reshape(n, c, ho, 2, wo, 2)
    return blocks.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)


def _unwindow2x2(windows, x_shape):
    """The adjoint of windows2x2: (N, C, Ho, Wo, 4) -> (N, C, H, W), zeros where not pooled."""
    xp = array_module(windows)
    n, c, h, w = x_shape
    ho, wo = h // 2, w // 2
    out = xp.zeros(x_shape, dtype=windows.dtype)
    out[:, :, :2 * ho, :2 * wo] = windows.reshape(n, c, ho, wo, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, 2 * ho, 2 * wo)
    return out


def pooled_shape(x_shape):
    """(N, C, H, W) -> (N, C, H//2, W//2)"""
    n, c, h, w = x_shape
    return (n, c, h // 2, w // 2)


def maxpool2x2_forward(ctx, x):
    xp = array_module(x)
    windows = windows2x2(x)
    winner = xp.argmax(windows, axis=-1)  # first maximum; NaN counts as the maximum
    ctx.save_for_backward(winner)
    ctx.x_shape = x.shape
    return xp.take_along_axis(windows, winner[..., None], axis=-1)[..., 0]


def maxpool2x2_backward(ctx, grad):
    (winner,) = ctx.saved_tensors
    xp = array_module(grad)
    routed = (winner[..., None] == xp.arange(4)) * grad[..., None]  # (N, C, Ho, Wo, 4)
    return (_unwindow2x2(routed.astype(grad.dtype), ctx.x_shape),)


def avgpool2x2_forward(ctx, x):
    ctx.x_shape = x.shape
    return windows2x2(x).mean(axis=-1)


def avgpool2x2_backward(ctx, grad):
    xp = array_module(grad)
    quarter = (grad * grad.dtype.type(0.25))[..., None]
    return (_unwindow2x2(xp.broadcast_to(quarter, quarter.shape[:-1] + (4,)), ctx.x_shape),)


def _pool_samples(rng, dtype):
    return [Sample((rng.standard_normal(shape).astype(dtype),))
            for shape in ((2, 3, 4, 6), (1, 2, 5, 7), (2, 1, 2, 2), (1, 3, 3, 2))]


def _pool_flops(x_shape):
    n, c, h, w = x_shape
    return 3 * n * c * (h // 2) * (w // 2)  # 3 compares (or adds) per window


def _pool_bytes(x_shape, itemsize=4):
    """Read x, write y (the backward pass: read grad_y, write grad_x -- the same bytes)."""
    n, c, h, w = x_shape
    return itemsize * (n * c * h * w + n * c * (h // 2) * (w // 2))


def _maxpool_bytes(x_shape, itemsize=4):
    """Plus the winner of each window (1 byte), written by forward and read by backward."""
    n, c, h, w = x_shape
    return _pool_bytes(x_shape, itemsize) + n * c * (h // 2) * (w // 2)


def _torch_pool(name):
    def pool(x):
        import torch.nn.functional as F
        return getattr(F, name)(x, 2)
    return pool


declare("max_pool2x2", forward=maxpool2x2_forward, backward=maxpool2x2_backward, check=_check_pool,
        flops=_pool_flops, bytes=_maxpool_bytes, backward_bytes=_maxpool_bytes, samples=_pool_samples,
        torch=_torch_pool("max_pool2d"), bench=map_bench(),
        api=Api("max_pool2x2", "MaxPool2", "2x2 max pooling, stride 2: (N, C, H, W) -> (N, C, H//2, W//2); the "
                "first maximum of a window wins ties."))
declare("avg_pool2x2", forward=avgpool2x2_forward, backward=avgpool2x2_backward, check=_check_pool,
        flops=_pool_flops, bytes=_pool_bytes, backward_bytes=_pool_bytes, samples=_pool_samples,
        torch=_torch_pool("avg_pool2d"), bench=map_bench(),
        api=Api("avg_pool2x2", "AvgPool2", "2x2 average pooling, stride 2: (N, C, H, W) -> (N, C, H//2, W//2)."))
