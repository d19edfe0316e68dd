"""pycnn's global seed.  Random ops (rrelu, dropout, augmentation) that are not given a seed
draw one from this generator, so ``pycnn.manual_seed(s)`` makes a whole run reproducible."""
from __future__ import annotations

import contextvars

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reset the global generator (seeds are never taken from the wall clock)."""
    global _generator
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _generator = np.random.default_rng(int(seed))


# set in the thread that captures a CUDA graph (pycnn.cuda_graph): placeholder seeds
_seed_source: contextvars.ContextVar = contextvars.ContextVar("pycnn_seed_source", default=None)


def next_seed() -> int:
    """A fresh 64-bit seed for one draw of a counter-based random op (inside a CUDA graph
    capture: a placeholder whose seed is drawn by ``draw_seed`` before each replay)."""
    source = _seed_source.get()
    if source is not None:
        return source()
    return draw_seed()


def draw_seed() -> int:
    """The next seed of the global generator, in [0, 2**63)."""
    return int(_generator.integers(0, 2 ** 63, dtype=np.int64))


def set_seed_source(source):
    """Make ``source()`` the provider of ``next_seed`` in this thread (None: the generator);
    returns a token for ``reset_seed_source``."""
    return _seed_source.set(source)


def reset_seed_source(token) -> None:
    _seed_source.reset(token)


def generator() -> np.random.Generator:
    return _generator
