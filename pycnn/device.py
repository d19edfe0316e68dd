"""Which arrays live where, and the C++ extension (``cpp_extension``, from pycnn._threads).

A NumPy array lives on the CPU, an array exposing ``__cuda_array_interface__`` (CuPy,
PyTorch CUDA tensors) on a CUDA device.  Which backend runs an op on them (and
``use_backend``, ``PYCNN_BACKEND``) is decided in ``pycnn.ops.routing``.
"""
from __future__ import annotations

import numpy as np

from pycnn._threads import cpp_extension  # noqa: F401 (the C++ extension, loaded once where its threads are set up)

BACKENDS = ("numpy", "cpp", "cuda")


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


_host_read_checks: list = []


def on_host_read(check) -> None:
    """Run ``check()`` after every ``to_host``: where errors that kernels found on the device
    without a host synchronisation (the cuda loss's label check) are raised, once the copy
    has synchronised."""
    if check not in _host_read_checks:
        _host_read_checks.append(check)


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (copied from the GPU when it lives there)."""
    host = a.get() if is_cuda_array(a) and hasattr(a, "get") else np.asarray(a)
    for check in _host_read_checks:
        check()
    return host


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
