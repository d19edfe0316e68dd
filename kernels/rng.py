"""Counter-based random numbers on the GPU: the formula of ``pycnn.ops._util`` (splitmix64),
written once as device functions, bit for bit the numbers of ``_util.uniform``.

    key = _util.seed_key(seed)                       (host, once per draw)
    z   = mix64(key + (i + 1) * GOLDEN)              (all arithmetic mod 2**64)
    u   = (z >> 40) * 2**-24                         (24 random bits: exact in float32)
"""
from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from pycnn.ops import _util

from ._launch import config_1d, launch, per_dtype

GOLDEN = np.uint64(_util.GOLDEN)  # module-level NumPy scalars: uint64 constants in kernels
MIX1 = np.uint64(_util.MIX1)
MIX2 = np.uint64(_util.MIX2)
UNIFORM_SCALE = 2.0 ** -24  # u = bits * 2**-24


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
    return np.uint64(_util.seed_key(seed))


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
    """Fill the 1-D float array ``out`` with ``_util.uniform(seed, out.size, out.dtype)``."""
    grid, block = config_1d(out.size)
    launch(_build(out.dtype), grid, block, out, out, host_key(seed))
