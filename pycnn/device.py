"""Which arrays live where, and which backend runs an op.

Device follows the array: a NumPy array runs on the CPU (the C++ backend ``cpp`` where the
extension is built, else the NumPy reference), an array exposing
``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors) runs on the CUDA backend.

``use_backend(name)`` (or the environment variable ``PYCNN_BACKEND``) forces a backend for
tests and benchmarks.  A forced backend is a preference per op: an op that the backend does
not implement runs its reference, which is written against the array API and so runs on
the device of its inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

import numpy as np

BACKENDS = ("numpy", "cpp", "cuda")

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("pycnn_backend", default=None)


def _check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` ('numpy', 'cpp' or 'cuda') for the ops run inside the block."""
    token = _forced_backend.set(_check_backend_name(name))
    try:
        yield
    finally:
        _forced_backend.reset(token)


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``PYCNN_BACKEND``, or None."""
    name = _forced_backend.get()
    if name is not None:
        return name
    env = os.environ.get("PYCNN_BACKEND", "").strip()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"environment variable PYCNN_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
        return env
    return None


# ----------------------------------------------------------------------------------- arrays

def is_cuda_array(a) -> bool:
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def array_module(a):
    """numpy for host arrays, cupy for device arrays (the array-API namespace of ``a``)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    if is_cuda_array(a):
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - only on a GPU machine without cupy
            raise TypeError("a CUDA array needs CuPy: pip install 'pycnn[cuda]'") from exc
        return cupy
    return np


def device_of(a) -> str:
    return "cuda" if is_cuda_array(a) else "cpu"


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (copied from the GPU when it lives there)."""
    return a.get() if is_cuda_array(a) and hasattr(a, "get") else np.asarray(a)


def to_device(a, device: str):
    """``a`` as a NumPy array (device 'cpu') or a CuPy array (device 'cuda')."""
    if device == "cpu":
        return to_host(a)
    if device == "cuda":
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError("device 'cuda' needs CuPy and an NVIDIA GPU: pip install 'pycnn[cuda]'") from exc
        return cupy.asarray(a)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


# ------------------------------------------------------------------------ the C++ extension

_extension = None
_extension_checked = False


def cpp_extension():
    """The compiled module ``pycnn._C``, or None (with one warning) where it is not built."""
    global _extension, _extension_checked
    if not _extension_checked:
        _extension_checked = True
        # No lasting OMP_WAIT_POLICY / GOMP_SPINCOUNT of ours: load_extension gives libgomp a
        # bounded spin only for the moment it starts and leaves os.environ as it was
        # (pycnn/_threads.py says why and what was measured).
        try:
            from pycnn._threads import load_extension
            _extension = load_extension()
        except ImportError as exc:
            warnings.warn(
                f"pycnn: the C++ extension pycnn._C is not available ({exc}); "
                "CPU ops run on the slow NumPy reference. Reinstall with `pip install .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _extension
