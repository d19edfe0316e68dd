"""pycnn's global seed.  Random ops (rrelu, dropout, augmentation) that are not given a seed
draw one from this generator, so ``pycnn.manual_seed(s)`` makes a whole run reproducible."""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reset the global generator (seeds are never taken from the wall clock)."""
    global _generator
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _generator = np.random.default_rng(int(seed))


def next_seed() -> int:
    """A fresh 64-bit seed for one draw of a counter-based random op."""
    return int(_generator.integers(0, 2 ** 63, dtype=np.int64))


def generator() -> np.random.Generator:
    return _generator
