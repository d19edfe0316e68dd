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

from ._launch import config_1d, launch, live_args, per_dtype
from .rng import UNIFORM_SCALE, host_key, random_bits24


@per_dtype
def _build(T):
    @cuda.jit
    def dropout_kernel(x, y, key, keys, key_index, threshold, scale):
        # x and y are flat (size,): y = x * (scale if kept else 0); also used for backward.
        # The stream key is keys[key_index] when key_index >= 0 (a captured step), else key.
        i = cuda.grid(1)
        if i < x.size:
            k = keys[key_index] if key_index >= 0 else key
            keep = random_bits24(k, i) >= threshold
            y[i] = x[i] * (scale if keep else T(0))
    return dropout_kernel


def _mask_args(dtype, p, seed):
    """(key, threshold, scale) for a draw with drop probability p."""
    dtype = np.dtype(dtype)
    threshold = math.ceil(float(dtype.type(p)) / UNIFORM_SCALE)  # exact: a power-of-two scaling
    scale = dtype.type(0.0 if p >= 1.0 else 1.0 / (1.0 - p))
    return host_key(seed), np.uint64(threshold), scale


def dropout_apply(x, y, p, seed, live_key=None) -> None:
    """y = x * mask(p, seed) for flat-viewable C-contiguous x, y (forward: x is the input;
    backward: x is the output gradient and y the input gradient).  ``live_key``: (table,
    index) of a uint64 stream key read on the device instead of seed's (pycnn.cuda_graph)."""
    grid, block = config_1d(x.size)
    key, threshold, scale = _mask_args(x.dtype, p, seed)
    keys, key_index = live_args(live_key, x, np.uint64)
    launch(_build(x.dtype), grid, block, x, x.reshape(-1), y.reshape(-1), key, keys, key_index, threshold, scale)
