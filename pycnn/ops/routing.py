"""The one routing policy: for each op call, which backend and algorithm run it, whether a
Conv3x3 + activation pair runs fused, and so what the profiler records.

* Device: the arrays decide.  CUDA arrays (``__cuda_array_interface__``) run on ``cuda``,
  host arrays on ``cpp`` where the extension is built, else on the NumPy reference.
* Forced backend: ``PYCNN_BACKEND`` (read once, when this module is imported) or the
  ``use_backend`` context manager (which wins).
* Algorithm: a named one must exist; ``auto`` asks the backend's own choice (registered by
  the backend with ``register_auto``; else its first registered algorithm), then its other
  algorithms in order.
* No silent fallback: a forced backend without the op, or whose implementations cannot take
  this call (``Impl.refuses``), raises ``NoImplementation``/``CannotRun``; a named algorithm
  that cannot take it raises too.  Only ``auto`` on an unforced backend moves on to the next
  implementation (last: the array-generic reference), and the route says what was picked.
* Fusion: ``plan_fused`` routes the fused op once; it is used only where it runs on the
  backend the unfused ops would run on.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable

from pycnn.device import BACKENDS, cpp_extension, is_cuda_array
from pycnn.ops import registry
from pycnn.ops.registry import REFERENCE, check_algo


class NoImplementation(NotImplementedError):
    """The backend that must run the call does not implement the op."""


class CannotRun(ValueError):
    """The chosen implementation cannot take these inputs (and nothing else may run them)."""


# ------------------------------------------------------------------ the forced backend

def _check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _from_environment(value: str | None) -> tuple[str | None, str | None]:
    """(backend or None, error message or None) of the PYCNN_BACKEND value."""
    value = (value or "").strip()
    if not value or value == "auto":
        return None, None
    if value not in BACKENDS:
        return None, f"environment variable PYCNN_BACKEND must be one of {BACKENDS} or 'auto', got {value!r}"
    return value, None


_ENV_BACKEND, _ENV_ERROR = _from_environment(os.environ.get("PYCNN_BACKEND"))  # read once, here
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pycnn_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` ('numpy', 'cpp' or 'cuda') for the ops run inside the block."""
    token = _forced.set(_check_backend_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``PYCNN_BACKEND`` (as read at import), or None."""
    name = _forced.get()
    if name is not None:
        return name
    if _ENV_ERROR is not None:
        raise ValueError(_ENV_ERROR)
    return _ENV_BACKEND


def cuda_simulated() -> bool:
    """Whether CUDA kernels run in numba's simulator (NUMBA_ENABLE_CUDASIM=1): then the cuda
    backend takes host (NumPy) arrays.  The one place pycnn asks."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


# ------------------------------------------------------------------ each backend's auto

_auto: dict[tuple[str, str], Callable] = {}
_defaults: dict[tuple[str, str], str] = {}


def register_auto(backend: str, op_name: str, choose: Callable) -> None:
    """``choose(shapes, params) -> algorithm``: the backend's own ``auto`` for the op; None
    clears it (``auto`` then tries the algorithms in the order they were registered)."""
    _auto[(backend, op_name)] = choose


def set_default(op_name: str, backend: str, algo: str | None) -> None:
    """Make ``algo`` what ``auto`` tries first for ``op_name`` on ``backend`` (None: the
    backend's own choice again).  The algorithm must be one the backend may register."""
    _check_backend_name(backend)
    if algo is None:
        _defaults.pop((op_name, backend), None)
    else:
        _defaults[(op_name, backend)] = check_algo(algo)


def default_algorithm(op_name: str, backend: str) -> str | None:
    """The algorithm set with ``set_default``, or None."""
    return _defaults.get((op_name, backend))


def preference(op, backend: str, shapes, params) -> list[str]:
    """The algorithms of ``backend`` for ``op`` in the order ``auto`` tries them: the one set
    with ``set_default``, else the backend's own choice, then the others as registered."""
    available = op.algorithms(backend)
    first = _defaults.get((op.name, backend))
    choose = _auto.get((backend, op.name))
    if first is None and choose is not None and len(available) > 1:
        first = choose(shapes, params)
    if first is not None:
        if first not in available:
            raise ValueError(f"{op.name}: the default algorithm {first!r} set for backend {backend!r} is not "
                             f"one of its algorithms {available}")
        available = [first] + [a for a in available if a != first]
    return available


# ------------------------------------------------------------------------- the routes

@dataclasses.dataclass(frozen=True)
class Route:
    """What runs one call: the backend, the algorithm and the implementation (the profiler
    records backend and algorithm)."""
    backend: str
    algo: str
    impl: object


def device_backend(inputs) -> str:
    """The backend for these arrays: the forced one (checked against the device) or the
    device's own."""
    on_gpu = any(is_cuda_array(x) for x in inputs if x is not None)
    backend = forced_backend()
    if backend is None:
        return "cuda" if on_gpu else ("cpp" if cpp_extension() is not None else "numpy")
    if backend == "cuda" and not on_gpu and not cuda_simulated():
        raise TypeError("backend 'cuda' needs CUDA arrays (CuPy), got host arrays")
    if backend == "cpp" and on_gpu:
        raise TypeError("backend 'cpp' needs host (NumPy) arrays, got CUDA arrays")
    return backend


def route(op, inputs, params, algo: str = "auto") -> Route:
    """The route of one call of ``op`` (see the module docstring)."""
    try:
        backend = device_backend(inputs)
    except TypeError as exc:
        raise TypeError(f"{op.name}: {exc}") from None
    forced = forced_backend() is not None
    available = op.algorithms(backend)
    if not available:
        how = " (forced by use_backend or PYCNN_BACKEND)" if forced else ""
        loaded = sorted({b for (b, _) in op.impls}, key=BACKENDS.index)  # without loading another backend
        raise NoImplementation(f"{op.name}: backend {backend!r}{how} does not implement this op; "
                               f"it runs on {loaded}")
    if algo != "auto" and algo not in available:
        raise ValueError(f"{op.name}: algo {algo!r} is not available on backend {backend!r}; "
                         f"choose one of {['auto'] + available}")
    shapes = [None if x is None else tuple(x.shape) for x in inputs]
    reasons = []
    for name in ([algo] if algo != "auto" else preference(op, backend, shapes, params)):
        impl = op.impls[(backend, name)]
        reason = impl.refuses(inputs, params) if impl.refuses is not None else None
        if reason is None:
            return Route(backend, name, impl)
        reasons.append(f"{name}: {reason}")
    if forced or algo != "auto":
        raise CannotRun(f"{op.name}: backend {backend!r} cannot run this call ({'; '.join(reasons)})")
    return Route(*REFERENCE, op.reference)  # auto, not forced: the array-generic reference


def plan_fused(op, inputs, params, algo: str = "auto") -> Route | None:
    """The route of a fused op, or None where it should not be fused: the backend that would
    run the unfused ops lacks it or cannot take this call (the unfused ops then run as they
    would without fusion)."""
    try:
        backend = device_backend(inputs)
        planned = route(op, inputs, params, algo)
    except (NoImplementation, CannotRun, TypeError, ValueError):
        return None
    return planned if planned.backend == backend else None


registry.set_router(route)
