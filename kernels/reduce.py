"""Reductions and fills shared by the kernels.

``block_sum`` (one value) and ``block_sums`` (several at once) are the shared-memory tree
reductions every reduction kernel uses: each block reduces its threads' partial sums, then
one thread adds the block's total to the output with an atomic (outputs are zeroed first
with ``zero``).
"""
from __future__ import annotations

import functools

from numba import cuda

from ._launch import SIMULATED, config_1d, kernel_named, launch, numba_type, per_dtype

# Threads per block of the reduction kernels: a power of two (the tree halves it).  The
# simulator runs every thread as a Python thread, so it gets small blocks.
REDUCE_THREADS = 16 if SIMULATED else 256
# Each reduction block loops over about this many elements per thread before reducing.
ELEMENTS_PER_THREAD = 32


def reduce_blocks(count: int, max_blocks: int = 1024) -> int:
    """Blocks that split a reduction over ``count`` elements (a grid-stride loop covers it)."""
    per_block = REDUCE_THREADS * ELEMENTS_PER_THREAD
    return max(1, min(max_blocks, -(-int(count) // per_block)))


@cuda.jit(device=True)
def block_sum(partial, value):
    """Sum of ``value`` over the threads of a 1-D block (every thread must call it; blockDim.x
    is a power of two and ``partial`` a shared array of at least blockDim.x elements).
    Returns the total to every thread."""
    tid = cuda.threadIdx.x
    partial[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            partial[tid] += partial[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = partial[0]
    cuda.syncthreads()  # partial may be reused by the next call
    return total


@cuda.jit(device=True)
def block_sums(partial, values, count):
    """Sums of ``count`` values per thread over a 1-D block in one tree reduction (one barrier
    per level for all of them).  ``values`` is a local array of ``count`` elements,
    ``partial`` a shared (count, blockDim.x) array; every thread must call it.  Afterwards
    partial[t, 0] holds the total of value t (until the caller writes to partial again)."""
    tid = cuda.threadIdx.x
    for t in range(count):
        partial[t, tid] = values[t]
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            for t in range(count):
                partial[t, tid] += partial[t, tid + stride]
        cuda.syncthreads()
        stride //= 2


@per_dtype
def _zero_kernel(T):
    @cuda.jit
    def zero_kernel(out):
        # out is 1-D
        i = cuda.grid(1)
        if i < out.size:
            out[i] = T(0)

    return zero_kernel


@cuda.jit(device=True)
def first(a, b):
    """The term of a plain sum of a."""
    return a


@functools.cache
def _channel_sum(T, term):
    @kernel_named(f"channel_sum_of_{term.py_func.__name__}")
    def channel_sum_kernel(a, b, out):
        # a and b are (N, C, P), out is (C,) zeroed: out[c] += sum over n, p of term(a, b) there
        # grid (blocks per channel, C), REDUCE_THREADS threads
        partial = cuda.shared.array(REDUCE_THREADS, T)
        n_, channels, inner = a.shape
        c = cuda.blockIdx.y
        acc = T(0)
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while e < n_ * inner:
            n, p = e // inner, e % inner
            acc += term(a[n, c, p], b[n, c, p])
            e += cuda.gridDim.x * cuda.blockDim.x
        total = block_sum(partial, acc)
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(out, c, total)
    return channel_sum_kernel


def zero(out) -> None:
    """out[...] = 0 for a C-contiguous array."""
    flat = out.reshape(-1)
    grid, block = config_1d(flat.size)
    launch(_zero_kernel(out.dtype), grid, block, flat, flat)


def channel_sum(a, out, b=None, term=first) -> None:
    """out[c] = sum of a[:, c, ...], or with b of term(a, b) (a device function of two values),
    for C-contiguous (N, C, ...) arrays and a (C,) output."""
    n, c = a.shape[0], a.shape[1]
    a3 = a.reshape(n, c, -1)
    zero(out)
    grid = (reduce_blocks(n * a3.shape[2]), c)
    launch(_channel_sum(numba_type(a.dtype), term), grid, (REDUCE_THREADS,), a3, a3,
           a3 if b is None else b.reshape(n, c, -1), out)
