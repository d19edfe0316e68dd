"""The counter-based random numbers of every backend (NumPy reference, C++, CUDA), defined
once: element ``i`` of a draw with seed ``s`` is output ``i`` of a splitmix64 stream keyed by
``s``.  A draw does not depend on how the work is split between threads, so a seed
reproduces the same numbers anywhere.

    key = mix(s * GOLDEN + GOLDEN)                     (host, once per draw)
    z   = mix(key + (i + 1) * GOLDEN)                  (all arithmetic mod 2**64)
    u   = (z >> 40) * 2**-24                           (24 random bits: exact in float32)
    mix(z): z = (z ^ z>>30) * MIX1; z = (z ^ z>>27) * MIX2; return z ^ z>>31

Pure NumPy (no numba): ``pycnn.ops`` reads it on the host, ``rng`` writes the same formula as
device functions.  csrc/common.hpp has the C++ copy (the tests compare all three bit for bit).
"""
from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
UNIFORM_SCALE = 2.0 ** -24  # u = bits * 2**-24


def mix64(z):
    """The splitmix64 finaliser of a uint64 array (NumPy or CuPy)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def seed_key(seed: int) -> int:
    """The 64-bit stream key of ``seed`` (computed once per draw)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    with np.errstate(over="ignore"):
        z = np.array([seed], dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(GOLDEN)
        return int(mix64(z)[0])
