"""A pool of the large host buffers that ops write their outputs to.

A training step allocates the same large arrays every step (activations and their gradients,
B x C x H x W floats, megabytes each) and has freed them all by its end.  Memory fresh from
the operating system costs a page fault and a zero-fill on first touch: on the README's net at
batch 128 that was 6,400 faults and 28 ms of kernel time per step (1 fault and 2 ms with this
pool).  The pool keeps freed buffers and hands them out again.

How it knows that a buffer is free: every array it hands out is a view of one of its blocks,
and NumPy makes the block itself the ``base`` of every view (of a view, ...), so a block is
referenced by the pool alone exactly when no array on it is alive.  CPython counts references
exactly; the count of a free block is measured once, at import, through the same code path.
Nothing has to give a buffer back.

Scope: the outputs of pycnn's ops on the host (``pycnn.ops._util.empty``) of at least
``MIN_BYTES``.  NumPy's own allocator and every other array in the process are untouched.
Requests are rounded up to 8 size classes per octave (at most 12.5% more memory), so a
smaller last batch reuses the blocks of a full one.  Idle blocks are kept up to a limit
(default: a quarter of physical memory, at most 4 GiB); past it, the least recently used idle
blocks are freed.  ``PYCNN_BUFFER_POOL=0`` turns the pool off (also off on interpreters
without exact reference counts: not CPython, or free-threaded).

    import pycnn.memory
    pycnn.memory.stats()       # blocks, bytes held / idle, hits, misses, limit
    pycnn.memory.release()     # free every idle block now
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

MIN_BYTES = 256 * 1024  # smaller requests: np.empty (malloc reuses small chunks without faults)
ALIGNMENT = 64          # bytes: a cache line, and the width of an AVX-512 register


def _default_limit() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 << 30
    return min(physical // 4, 4 << 30)


def _exact_refcounts() -> bool:
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return sys.implementation.name == "cpython" and gil


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to the next of 8 sizes per octave."""
    step = 1 << max(nbytes.bit_length() - 4, 0)
    return -(-nbytes // step) * step


class _Block:
    __slots__ = ("raw", "last_use")

    def __init__(self, nbytes: int):
        self.raw = np.empty(nbytes + ALIGNMENT, np.uint8)
        self.last_use = 0

    def references(self) -> int:
        return sys.getrefcount(self.raw)

    def view(self, shape, dtype: np.dtype, nbytes: int) -> np.ndarray:
        offset = -self.raw.ctypes.data % ALIGNMENT
        return self.raw[offset:offset + nbytes].view(dtype).reshape(shape)


_FREE_REFERENCES = _Block(0).references()  # a block no array is using


class _Pool:
    def __init__(self):
        self.lock = threading.Lock()
        self.classes: dict[int, list[_Block]] = {}  # size class -> its blocks
        self.held = 0           # bytes in blocks, used or idle
        self.limit = _default_limit()
        self.enabled = _exact_refcounts() and os.environ.get("PYCNN_BUFFER_POOL", "1").strip() != "0"
        self.clock = 0
        self.hits = self.misses = 0

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not self.enabled or nbytes < MIN_BYTES:
            return np.empty(shape, dtype)
        size = _size_class(nbytes)
        with self.lock:
            self.clock += 1
            blocks = self.classes.setdefault(size, [])
            block = next((b for b in blocks if b.references() == _FREE_REFERENCES), None)
            if block is None:
                self.misses += 1
                self._make_room(size)
                block = _Block(size)
                blocks.append(block)
                self.held += size
            else:
                self.hits += 1
            block.last_use = self.clock
            return block.view(shape, dtype, nbytes)

    def _idle(self) -> list[tuple[int, _Block]]:
        return [(size, b) for size, blocks in self.classes.items() for b in blocks
                if b.references() == _FREE_REFERENCES]

    def _free(self, size: int, block: _Block) -> None:
        self.classes[size].remove(block)
        self.held -= size

    def _make_room(self, size: int) -> None:
        """Free the least recently used idle blocks until ``size`` more bytes fit the limit."""
        if self.held + size <= self.limit:
            return
        for block_size, block in sorted(self._idle(), key=lambda item: item[1].last_use):
            self._free(block_size, block)
            if self.held + size <= self.limit:
                return

    def release(self) -> int:
        with self.lock:
            idle = self._idle()
            for size, block in idle:
                self._free(size, block)
            return sum(size for size, _ in idle)

    def stats(self) -> dict:
        with self.lock:
            idle = sum(size for size, _ in self._idle())
            return {"enabled": self.enabled, "blocks": sum(map(len, self.classes.values())), "held_bytes": self.held,
                    "idle_bytes": idle, "limit_bytes": self.limit, "hits": self.hits, "misses": self.misses}


_pool = _Pool()


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous host array, 64-byte aligned when it comes from the pool."""
    return _pool.empty(shape, dtype)


def stats() -> dict:
    """enabled, blocks, held_bytes (used or idle), idle_bytes, limit_bytes, hits, misses."""
    return _pool.stats()


def release() -> int:
    """Free every idle block now; returns the bytes freed."""
    return _pool.release()


def set_limit(nbytes: int) -> int:
    """Keep at most ``nbytes`` in blocks (idle blocks past it are freed); returns the old limit."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
        raise ValueError(f"nbytes must be an integer >= 0, got {nbytes!r}")
    with _pool.lock:
        old, _pool.limit = _pool.limit, int(nbytes)
        _pool._make_room(0)
    return old


def set_enabled(enabled: bool) -> bool:
    """Turn the pool on or off (blocks in use stay valid); returns the previous setting.
    Turning it on where reference counts are not exact raises RuntimeError."""
    if enabled and not _exact_refcounts():
        raise RuntimeError("the buffer pool needs CPython with the GIL (exact reference counts)")
    with _pool.lock:
        old, _pool.enabled = _pool.enabled, bool(enabled)
    return old
