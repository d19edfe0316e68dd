"""Arrays of other frameworks, taken in without a copy: a PyTorch tensor becomes a NumPy array
(CPU) or a CuPy array (CUDA) sharing its memory, any other DLPack exporter likewise.  The one
place where pycnn reads other frameworks' arrays (``pycnn.autograd`` and ``pycnn.torch`` call it).
"""
from __future__ import annotations

import sys

import numpy as np

# DLPack device types (dlpack.h): where an exported array lives.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def from_torch(tensor):
    """A PyTorch tensor's data without a copy: NumPy for a CPU tensor, CuPy for a CUDA one
    (through DLPack, on CuPy's current stream).  The gradient and graph are left behind."""
    tensor = tensor.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if tensor.device.type == "cpu":
        try:
            return tensor.numpy()
        except TypeError as exc:  # bfloat16 and other types NumPy lacks
            raise TypeError(f"pycnn cannot take a torch tensor of dtype {tensor.dtype}: {exc}") from None
    if tensor.device.type == "cuda":
        return _cupy("a CUDA torch tensor").from_dlpack(tensor)
    raise TypeError(f"pycnn takes CPU and CUDA torch tensors, got one on {tensor.device}")


def _cupy(what: str):
    try:
        import cupy
    except ImportError as exc:
        raise TypeError(f"{what} needs CuPy: pip install 'pycnn[cuda]'") from exc
    return cupy


def array_from_dlpack(obj):
    """The NumPy (host) or CuPy (CUDA) array that shares the memory of a DLPack exporter."""
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(f"from_dlpack needs an object with __dlpack__ and __dlpack_device__, got {type(obj).__name__} "
                        "(a bare capsule is not enough)")
    device_type = int(obj.__dlpack_device__()[0])
    if device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        return _cupy("a CUDA DLPack array").from_dlpack(obj)
    if device_type in (_DL_CPU, _DL_CUDA_HOST):
        return np.from_dlpack(obj)
    raise TypeError(f"pycnn runs on the CPU and on CUDA devices; this array lives on DLPack device type {device_type}")


def foreign_array(obj):
    """``obj`` as pycnn's arrays are, without a copy, where it comes from another framework:
    a torch tensor or another DLPack exporter becomes a NumPy or CuPy array sharing its
    memory.  NumPy and CuPy arrays, numbers, None and the rest come back as they are (a pycnn
    Tensor is an exporter too: ``autograd`` keeps Tensors away from here)."""
    if obj is None or isinstance(obj, (np.ndarray, np.generic, int, float, tuple, list, str, dict)):
        return obj
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return from_torch(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        return obj  # CuPy and other CUDA arrays: array_module takes them as they are
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return array_from_dlpack(obj)
    return obj
