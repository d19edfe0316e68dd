"""Shared helpers for op implementations: argument checks, output allocation, random numbers."""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

from pycnn import memory
from pycnn.device import array_module

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# ------------------------------------------------------------------------------ arg checks


def _native(dtype) -> np.dtype:
    """``dtype`` in the machine's byte order (big-endian float32 counts as float32)."""
    return np.dtype(dtype).newbyteorder("=")


def check_float(name: str, a) -> None:
    """``a`` must be a float32 or float64 array (of either byte order)."""
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if _native(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")


def check_same_dtype(**arrays) -> None:
    dtypes = {name: _native(a.dtype) for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"arguments must share one dtype, got {listed}")


def check_ndim(name: str, a, allowed) -> None:
    allowed = (allowed,) if isinstance(allowed, int) else tuple(allowed)
    if a.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(a.shape)}")


def check_shape(name: str, a, expected) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


def check_same_device(**arrays) -> None:
    modules = {name: array_module(a).__name__ for name, a in arrays.items() if a is not None}
    if len(set(modules.values())) > 1:
        listed = ", ".join(f"{n} on {m}" for n, m in modules.items())
        raise TypeError(f"arguments must live on one device, got {listed}")


def check_float_arrays(**arrays) -> None:
    """Every given array (None skipped) is float32/float64, of one dtype, on one device."""
    for name, a in arrays.items():
        if a is not None:
            check_float(name, a)
    check_same_dtype(**arrays)
    check_same_device(**arrays)


def check_positive_number(name: str, value, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


# ------------------------------------------------------------------------ output allocation

_nan_fill: contextvars.ContextVar[bool] = contextvars.ContextVar("pycnn_nan_fill", default=False)


@contextlib.contextmanager
def nan_filled_outputs():
    """Inside the block every op output is allocated full of NaN, so an element an
    implementation forgot to write shows up in the comparison with the reference."""
    token = _nan_fill.set(True)
    try:
        yield
    finally:
        _nan_fill.reset(token)


def empty(shape, dtype, like):
    """An uninitialised output array on the device of ``like`` (NaN-filled under test); on the
    host, large ones come from the buffer pool (pycnn.memory)."""
    xp = array_module(like)
    out = memory.empty(shape, dtype) if xp is np else xp.empty(shape, dtype=dtype)
    if _nan_fill.get():
        out.fill(np.nan)
    return out


def empty_like(a):
    return empty(a.shape, a.dtype, a)


def contiguous(a):
    """``a`` as a C-contiguous array of the same shape (no copy when it already is one;
    ``ascontiguousarray`` alone would turn a 0-d array into a 1-d one)."""
    if a.flags.c_contiguous:
        return a
    return array_module(a).ascontiguousarray(a)


def kernel_array(a):
    """``a`` as both backends' kernels read it: C-contiguous, and for a NumPy array also
    aligned and in native byte order (no copy when it already is one), so any valid array
    works (sliced, transposed, negative strides, unaligned, read-only, big-endian).  What is
    not an array (None, a number) is returned as is."""
    if isinstance(a, np.ndarray):
        if a.flags.c_contiguous and a.flags.aligned and a.dtype.isnative:
            return a
        return np.require(a, a.dtype.newbyteorder("="), ("C_CONTIGUOUS", "ALIGNED"))
    return contiguous(a) if hasattr(a, "__cuda_array_interface__") else a


# ------------------------------------------------------------------ a recorded step
# A layer above the ops may record a training step's launches to replay them (pycnn.cuda_graph);
# while it does, kernels read the values that change from step to step from its live table.
# It hooks itself in with ``set_live_table``, so that no op imports it.
_live_table = None


def set_live_table(current) -> None:
    """``current()``: the live table of the step being recorded in this thread, or None."""
    global _live_table
    _live_table = current


def live_table():
    """The live table of the step being recorded in this thread, or None."""
    return None if _live_table is None else _live_table()


# ------------------------------------------------------------------ counter-based randomness
# One formula for every backend, defined in pycnn.kernels.splitmix (a pure NumPy module).
from pycnn.kernels.splitmix import GOLDEN, UNIFORM_SCALE, mix64, seed_key  # noqa: E402


def uniform(seed: int, size: int, dtype, like=None):
    """``size`` counter-based U[0, 1) numbers for ``seed`` (see the formula above)."""
    table = live_table()
    if table is not None:  # a recorded step refuses a seed that stands for each replay's draw
        table.check_host_draw(seed)
    xp = np if like is None else array_module(like)
    index = xp.arange(1, size + 1, dtype=xp.uint64)
    with np.errstate(over="ignore"):
        z = mix64(xp.uint64(seed_key(seed)) + index * xp.uint64(GOLDEN))
    return ((z >> xp.uint64(40)).astype(dtype)) * dtype.type(UNIFORM_SCALE)


def check_integer(name: str, value, low: int) -> int:
    """``value`` as an int, if it is an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if seed < 0 or seed >= 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)
