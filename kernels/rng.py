"""Counter-based random numbers on the GPU: the formula of ``splitmix`` written as device
functions, bit for bit the numbers of the host reference.

    key = splitmix.seed_key(seed)                    (host, once per draw)
    z   = mix64(key + (i + 1) * GOLDEN)              (all arithmetic mod 2**64)
    u   = (z >> 40) * 2**-24                         (24 random bits: exact in float32)
"""
from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from . import splitmix
from ._launch import config_1d, launch, per_dtype
from .splitmix import UNIFORM_SCALE  # noqa: F401 (kernels import it from here)

GOLDEN = np.uint64(splitmix.GOLDEN)  # module-level NumPy scalars: uint64 constants in kernels
MIX1 = np.uint64(splitmix.MIX1)
MIX2 = np.uint64(splitmix.MIX2)


@cuda.jit(device=True)
def mix64(z):
    """The splitmix64 finaliser of a uint64."""
    z = (z ^ (z >> numba.uint64(30))) * MIX1
    z = (z ^ (z >> numba.uint64(27))) * MIX2
    return z ^ (z >> numba.uint64(31))


@cuda.jit(device=True)
def random_bits24(key, i):
    """24 random bits (a uint64 in [0, 2**24)) of element ``i`` (0-based) of the stream ``key``."""
    z = mix64(numba.uint64(key) + numba.uint64(i + 1) * GOLDEN)
    return z >> numba.uint64(40)


def host_key(seed: int) -> np.uint64:
    """The stream key of ``seed``, as the uint64 a kernel takes."""
    return np.uint64(splitmix.seed_key(seed))


@per_dtype
def _build(T):
    @cuda.jit
    def uniform_kernel(out, key):
        # out is (size,): out[i] = U[0, 1) number i of the stream
        i = cuda.grid(1)
        if i < out.size:
            out[i] = T(random_bits24(key, i)) * T(UNIFORM_SCALE)
    return uniform_kernel


def uniform(seed: int, out) -> None:
    """Fill the 1-D float array ``out`` with U[0, 1) numbers 0 .. out.size - 1 of ``seed``'s stream."""
    grid, block = config_1d(out.size)
    launch(_build(out.dtype), grid, block, out, out, host_key(seed))
