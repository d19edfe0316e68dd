"""Launch helpers shared by every kernel module: launch configurations, device views of
arrays, the stream to launch on, and per-dtype specialisation.

Arrays: anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors through
``cupy.asarray``) is wrapped with ``cuda.as_cuda_array`` (no copy); under the simulator
(``NUMBA_ENABLE_CUDASIM=1``) NumPy arrays are passed as they are and modified in place.

Streams: a kernel runs on CuPy's current stream, so it is ordered with the CuPy (and
reference) work around it; NumPy arrays (simulator) use the default stream.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import numba
import numpy as np
from numba import cuda

# NUMBA_ENABLE_CUDASIM=1: kernels run in numba's CUDA simulator, on NumPy arrays
SIMULATED = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))

THREADS_1D = 256  # threads per block of the element-wise kernels (reductions: reduce.REDUCE_THREADS)


def blocks_for(n: int, threads: int = THREADS_1D) -> int:
    """Blocks of ``threads`` threads that cover ``n`` elements (at least one)."""
    return max(1, -(-int(n) // threads))


def config_1d(n: int, threads: int = THREADS_1D, max_blocks: int | None = None):
    """(grid, block) of a 1-D launch over ``n`` elements; with ``max_blocks`` the kernel must
    use a grid-stride loop."""
    blocks = blocks_for(n, threads)
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    return (blocks,), (threads,)


def numba_type(dtype):
    """The numba scalar type of a NumPy dtype (float32 -> numba.float32)."""
    return numba.from_dtype(np.dtype(dtype))


def per_dtype(builder):
    """Decorator: ``builder(T, *specialisation)`` makes the kernels for the numba scalar type
    ``T`` (and, say, an activation's name); the result is called with a NumPy dtype and the
    same further arguments and cached, so each combination compiles once."""
    cached = functools.lru_cache(maxsize=None)(builder)

    @functools.wraps(builder)
    def for_dtype(dtype, *specialisation):
        return cached(numba_type(dtype), *specialisation)
    return for_dtype


def kernel_named(name: str):
    """``cuda.jit`` for a kernel body built once per specialisation (an activation): the
    kernel gets ``name`` as its name, which profiles, launch traces and the PTX cache show."""
    def jit(function):
        function.__name__ = function.__qualname__ = name
        return cuda.jit(function)
    return jit


def array_module(a):
    """NumPy for a host array (the simulator), CuPy for a CUDA array."""
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        return np
    import cupy
    return cupy


_empty_arrays: dict = {}


def empty_of(like, dtype=None):
    """A cached (0,) array of ``dtype`` (default: like's) on like's device: what a kernel gets
    for an array argument it does not read (an unused slot, an absent live table)."""
    dtype = np.dtype(like.dtype if dtype is None else dtype)
    device = getattr(getattr(like, "device", None), "id", None)
    key = (type(like), dtype, device)
    empty = _empty_arrays.get(key)
    if empty is None:
        empty = _empty_arrays[key] = array_module(like).empty(0, dtype)
    return empty


def live_args(live, like, dtype):
    """The (table, index) kernel arguments of a value that a captured CUDA graph reads from
    device memory: ``live`` is the pair (table, index) that pycnn.cuda_graph hands out; for
    ``live`` None, an empty table and index -1 (the kernel uses its by-value argument)."""
    if live is None:
        return empty_of(like, dtype), np.int32(-1)
    table, index = live
    return table, np.int32(index)


def on_device(a):
    """What a kernel is launched with: a NumPy array in the simulator, else a device view."""
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        return a
    # sync=False: no host-blocking wait on the producer's stream.  The kernel runs on CuPy's
    # current stream, after the work already queued there (arrays made on another stream,
    # e.g. PyTorch's, must be synchronised by the caller, as in any CuPy code).
    return cuda.as_cuda_array(a, sync=False)


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int):
    return cuda.external_stream(ptr)


def stream_of(a):
    """The stream to launch on for array ``a``: CuPy's current stream, else the default one."""
    if isinstance(a, np.ndarray) or SIMULATED:
        return 0
    try:
        import cupy
    except ImportError:  # a CUDA array without CuPy (e.g. a numba device array)
        return 0
    ptr = cupy.cuda.get_current_stream().ptr
    return _external_stream(ptr) if ptr else 0


@contextlib.contextmanager
def _quiet_simulator():
    # The simulator runs kernels as Python code on NumPy scalars, where the mod-2**64
    # arithmetic of the random-number hash warns about overflow; on a GPU it just wraps.
    if not SIMULATED:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        yield


_launches = 0  # every launch through ``launch`` in this process (both paths)
_trace = None   # a list while ``tracing``: what each launch baked in


@contextlib.contextmanager
def tracing(trace: list):
    """Append to ``trace``, for every launch in the block, (kernel name, grid, block, the
    shapes of its arrays and its by-value arguments): what a captured CUDA graph fixes."""
    global _trace
    previous, _trace = _trace, trace
    try:
        yield trace
    finally:
        _trace = previous


def _baked(kernel, grid, block, args) -> tuple:
    values = tuple(("array", a.dtype.str, a.shape) if _is_array(a) else (type(a).__name__, a) for a in args)
    return (kernel.py_func.__qualname__, tuple(np.atleast_1d(grid)), tuple(np.atleast_1d(block)), values)


def launch_count() -> int:
    """Kernels launched through ``launch`` so far in this process, on either path and in the
    simulator too (the kernels per training step: the difference of two readings)."""
    return _launches


def launch(kernel, grid, block, like, *args) -> None:
    """``kernel[grid, block, stream](*args)`` on the stream of ``like`` (an array the kernel
    works on).  CuPy arrays go through the raw launch path (``_rawlaunch``: compiled once
    per signature, launched by CuPy on its current stream); anything else, and every
    launch under ``PYCNN_CUDA_LAUNCH=numba``, through Numba's dispatcher."""
    global _launches
    if 0 in (grid if isinstance(grid, tuple) else (grid,)):
        return  # no blocks: nothing to do (a CUDA launch with an empty grid is an error)
    _launches += 1
    if _trace is not None:
        _trace.append(_baked(kernel, grid, block, args))
    if _raw_launch_wanted(like) and kernel not in _numba_only:
        try:
            raw = _rawlaunch.compiled(kernel, args)
        except Exception as exc:  # noqa: BLE001 - any compile/ABI failure: say so, use Numba
            _numba_only.add(kernel)
            warnings.warn(f"pycnn: kernel {kernel.py_func.__qualname__} runs through Numba's slower launch "
                          f"path: the raw launch path failed to compile it ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=3)
        else:
            raw(grid if isinstance(grid, tuple) else (grid,), block if isinstance(block, tuple) else (block,), args)
            return
    stream = stream_of(like)
    args = tuple(on_device(a) if _is_array(a) else a for a in args)
    with _quiet_simulator():
        kernel[grid, block, stream](*args)


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) or hasattr(a, "__cuda_array_interface__")


# ------------------------------------------------------------------- the raw launch path

_numba_only: set = set()  # kernels whose raw compilation failed (warned once each)
_cupy_ndarray = None


def _raw_launch_wanted(like) -> bool:
    global _cupy_ndarray
    if SIMULATED or isinstance(like, np.ndarray):
        return False
    if _cupy_ndarray is None:
        try:
            import cupy
        except ImportError:
            return False
        _cupy_ndarray = cupy.ndarray
    return isinstance(like, _cupy_ndarray) and os.environ.get("PYCNN_CUDA_LAUNCH", "raw") != "numba"


from . import _rawlaunch  # noqa: E402  (after launch: _rawlaunch needs nothing from here)
