"""Inverted dropout, the rule of ``pycnn.ops.dropout``: element i is kept when its
counter-based number u_i (``_util.uniform``) is >= p, and kept elements are scaled by
1 / (1 - p).  The mask is never stored: backward draws it again from the seed.

u_i = bits_i * 2**-24 exactly, so ``u_i >= p`` is decided on the integers:
bits_i >= ceil(p * 2**24), with p rounded to the array's dtype first as the reference does.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ._launch import config_1d, launch, per_dtype
from .rng import UNIFORM_SCALE, host_key, random_bits24


@per_dtype
def _build(T):
    @cuda.jit
    def dropout_kernel(x, y, key, threshold, scale):
        # x and y are flat (size,): y = x * (scale if kept else 0); also used for backward
        i = cuda.grid(1)
        if i < x.size:
            keep = random_bits24(key, i) >= threshold
            y[i] = x[i] * (scale if keep else T(0))
    return dropout_kernel


def _mask_args(dtype, p, seed):
    """(key, threshold, scale) for a draw with drop probability p."""
    dtype = np.dtype(dtype)
    threshold = math.ceil(float(dtype.type(p)) / UNIFORM_SCALE)  # exact: a power-of-two scaling
    scale = dtype.type(0.0 if p >= 1.0 else 1.0 / (1.0 - p))
    return host_key(seed), np.uint64(threshold), scale


def dropout_apply(x, y, p, seed) -> None:
    """y = x * mask(p, seed) for flat-viewable C-contiguous x, y (forward: x is the input;
    backward: x is the output gradient and y the input gradient)."""
    grid, block = config_1d(x.size)
    launch(_build(x.dtype), grid, block, x, x.reshape(-1), y.reshape(-1), *_mask_args(x.dtype, p, seed))
