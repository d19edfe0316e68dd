"""Optimiser updates, one kernel per parameter instead of six array operations.

SGD with momentum, the rules of ``pycnn.optim.SGD`` (PyTorch's formulation), in place on
flat (size,) views of C-contiguous arrays:
    g = grad + weight_decay * w
    v = g (first step) or momentum * v + g
    w -= lr * (g + momentum * v)   if nesterov, else   w -= lr * v
and Adam with bias correction, the rules of ``pycnn.optim.Adam`` (weight decay as L2 on g):
    g = grad + weight_decay * w
    m = (1 - beta1) g (first step) or beta1 m + (1 - beta1) g;   v likewise with g^2, beta2
    w -= lr * (m / bias1) / (sqrt(v / bias2) + eps),   bias_k = 1 - beta_k^step (host)
"""
from __future__ import annotations

import math
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

    @cuda.jit
    def adam(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2, first):
        i = cuda.grid(1)
        if i < w.size:
            g = grad[i] + weight_decay * w[i]
            mi = (T(1) - beta1) * g if first else beta1 * m[i] + (T(1) - beta1) * g
            vi = (T(1) - beta2) * g * g if first else beta2 * v[i] + (T(1) - beta2) * g * g
            m[i] = mi
            v[i] = vi
            w[i] -= lr * (mi / bias1) / (math.sqrt(vi / bias2) + eps)

    return SimpleNamespace(sgd_momentum=sgd_momentum, sgd_plain=sgd_plain, adam=adam)


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


def adam_step(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """Adam step number ``step`` (1, 2, ...) on the C-contiguous array w, in place; m and v
    are its moment arrays (read from step 2 on, written always)."""
    dtype = w.dtype.type
    flat_w = w.reshape(-1)
    grid, block = config_1d(flat_w.size)
    launch(_build(w.dtype).adam, grid, block, flat_w, flat_w, grad.reshape(-1), m.reshape(-1), v.reshape(-1),
           dtype(lr), dtype(beta1), dtype(beta2), dtype(eps), dtype(weight_decay), dtype(1 - beta1 ** step),
           dtype(1 - beta2 ** step), np.uint8(step == 1))
