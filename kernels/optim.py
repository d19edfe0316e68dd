"""Optimiser updates, one kernel per parameter instead of six array operations.

SGD with momentum, the rules of ``pycnn.optim.SGD`` (PyTorch's formulation), in place on
flat (size,) views of C-contiguous arrays:
    g = grad + weight_decay * w
    v = g (first step) or momentum * v + g
    w -= lr * (g + momentum * v)   if nesterov, else   w -= lr * v
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import cuda

from ._launch import config_1d, launch, per_dtype


@per_dtype
def _build(T):
    @cuda.jit
    def sgd_momentum(w, grad, velocity, lr, momentum, weight_decay, nesterov, first):
        i = cuda.grid(1)
        if i < w.size:
            g = grad[i] + weight_decay * w[i]
            v = g if first else momentum * velocity[i] + g
            velocity[i] = v
            w[i] -= lr * (g + momentum * v if nesterov else v)

    @cuda.jit
    def sgd_plain(w, grad, lr, weight_decay):
        i = cuda.grid(1)
        if i < w.size:
            w[i] -= lr * (grad[i] + weight_decay * w[i])

    return SimpleNamespace(sgd_momentum=sgd_momentum, sgd_plain=sgd_plain)


def sgd_step(w, grad, velocity, lr, momentum, weight_decay, nesterov, first) -> None:
    """One SGD step on the C-contiguous array w (in place; velocity too, or None without
    momentum)."""
    dtype = w.dtype.type
    flat_w, flat_g = w.reshape(-1), grad.reshape(-1)
    grid, block = config_1d(flat_w.size)
    kernels = _build(w.dtype)
    if velocity is None:
        launch(kernels.sgd_plain, grid, block, flat_w, flat_w, flat_g, dtype(lr), dtype(weight_decay))
    else:
        launch(kernels.sgd_momentum, grid, block, flat_w, flat_w, flat_g, velocity.reshape(-1), dtype(lr),
               dtype(momentum), dtype(weight_decay), np.uint8(nesterov), np.uint8(first))
