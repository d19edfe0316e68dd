"""Torch tensors and pycnn's arrays: the conversions both ways (no copies), aliasing tests,
the device and stream a call runs on, and the profiler's record of a call."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from pycnn.foreign import from_torch
from pycnn.profiler import current_profile

# ------------------------------------------------------------------------ arrays and tensors


def array(tensor):
    """A torch tensor's data as a NumPy (CPU) or CuPy (CUDA) array, sharing its memory."""
    return None if tensor is None else from_torch(tensor)


def tensor(a) -> torch.Tensor:
    """A NumPy or CuPy array as a torch tensor sharing its memory (a copy only where torch
    cannot hold the layout: negative strides, read-only or misaligned memory)."""
    if hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    a = np.asarray(a)
    if not (a.flags.writeable and a.flags.aligned and a.dtype.isnative) or any(s < 0 for s in a.strides):
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
    return torch.from_numpy(a)


def _ptr(a) -> int:
    """The address of a NumPy or CuPy array's first element."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr


def aliases(a, b) -> bool:
    """Whether arrays ``a`` and ``b`` (NumPy or CuPy; anything else never does) may share memory."""
    if a is b:
        return a is not None
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.may_share_memory(a, b)
    if isinstance(b, np.ndarray) or not hasattr(a, "__cuda_array_interface__") \
            or not hasattr(b, "__cuda_array_interface__"):
        return False  # one on the host, one on the GPU, or not an array
    import cupy
    return cupy.may_share_memory(a, b)


def same_view(a, b) -> bool:
    return (a is b) or (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
                        and aliases(a, b) and _ptr(a) == _ptr(b))


def _view_of(base, base_array, out):
    """``out``, an array inside the memory of tensor ``base`` (whose data is ``base_array``), as
    a torch view of ``base`` (so torch knows they alias); None where torch cannot express it."""
    itemsize = out.dtype.itemsize
    if out.dtype != base_array.dtype or any(s < 0 or s % itemsize for s in out.strides):
        return None
    delta = _ptr(out) - base.data_ptr()
    if delta % itemsize:
        return None
    return torch.as_strided(base, tuple(out.shape), tuple(s // itemsize for s in out.strides),
                            base.storage_offset() + delta // itemsize)


def output(out, arrays, inputs) -> torch.Tensor:
    """The forward's result as a torch tensor: a view of the input it lives in, if any."""
    if not hasattr(out, "__cuda_array_interface__"):
        out = np.asarray(out)
    for a, t in zip(arrays, inputs):
        if aliases(out, a):
            view = _view_of(t, a, out)
            return view if view is not None else tensor(out.copy())
    return tensor(out)


def saved_arrays(ctx) -> list:
    """The arrays an implementation kept on its context for backward (saved_tensors, array
    attributes, and the contexts of the parts of a composed op, one level down)."""
    found = []
    for value in (ctx.saved_tensors, *vars(ctx).values()):
        parts = value if isinstance(value, (tuple, list)) else (value,)
        for part in parts:
            if hasattr(part, "saved_tensors"):
                found.extend(x for x in part.saved_tensors if hasattr(x, "dtype"))
            elif hasattr(part, "dtype") and hasattr(part, "shape"):
                found.append(part)
    return found


def device_context(tensors):
    """Run pycnn on the device of ``tensors``: for CUDA tensors, that device and torch's
    current stream as CuPy's current stream (the Numba kernels launch on it); nothing on the CPU."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    return _cuda_stream(device)


@contextlib.contextmanager
def _cuda_stream(device):
    try:
        import cupy
    except ImportError as exc:
        raise TypeError("pycnn on CUDA torch tensors needs CuPy: pip install 'pycnn[cuda]'") from exc
    index = device.index if device.index is not None else torch.cuda.current_device()
    current = torch.cuda.current_stream(device)
    if current.cuda_stream == 0:  # torch's default: the legacy default stream
        stream = cupy.cuda.Stream.null
    elif hasattr(cupy.cuda.Stream, "from_external") and hasattr(current, "__cuda_stream__"):
        stream = cupy.cuda.Stream.from_external(current)  # CuPy 14: the CUDA stream protocol
    else:
        stream = cupy.cuda.ExternalStream(current.cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        yield


def timed(name, backend, algo, phase, call, *args, **kwargs):
    """``call(*args, **kwargs)``, recorded in ``pycnn.profile()`` when one is open."""
    profile = current_profile()
    if profile is None:
        return call(*args, **kwargs)
    start = profile.clock()
    out = call(*args, **kwargs)
    profile.add(name, backend, algo, phase, profile.clock() - start)
    return out


