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


_seed_source = None  # set while a CUDA graph is captured (pycnn.cuda_graph): placeholder seeds


def next_seed() -> int:
    """A fresh 64-bit seed for one draw of a counter-based random op (inside a CUDA graph
    capture: a placeholder whose seed is drawn by ``draw_seed`` before each replay)."""
    if _seed_source is not None:
        return _seed_source()
    return draw_seed()


def draw_seed() -> int:
    """The next seed of the global generator, in [0, 2**63)."""
    return int(_generator.integers(0, 2 ** 63, dtype=np.int64))


def set_seed_source(source):
    """Make ``source()`` the provider of ``next_seed`` (None: the generator); returns the
    previous one."""
    global _seed_source
    previous, _seed_source = _seed_source, source
    return previous


def generator() -> np.random.Generator:
    return _generator
