"""Launching Numba kernels on CuPy arrays without Numba's per-call dispatch.

A Numba launch with CuPy arguments costs 60-90 us of host time (type inference of every
argument, a device-array wrapper per array, the dispatcher's cache lookup), several times
what an element-wise kernel at batch 256 runs on an H200.  This module keeps Numba as the
kernel language but does the dispatch once per argument signature:

1. ``numba.cuda.compile_ptx`` compiles the kernel's Python function for the signature that
   Numba itself would infer, for the current device's compute capability;
2. the PTX is stored in an on-disk cache (``PYCNN_CACHE_DIR``, default
   ``~/.cache/pycnn/ptx``), keyed by the kernel's source, its closure values, the
   signature, the architecture and the numba-cuda version, so a new process skips NVVM;
3. CuPy loads it (``cupy.RawModule(path=...)``: the driver JIT-compiles the PTX, and caches
   the result itself) and launches it on CuPy's current stream.

Numba's kernel ABI passes each array argument as the fields of its array struct, 8 bytes
each: meminfo, parent, nitems, itemsize, data, shape[ndim], strides[ndim] (meminfo and
parent are unused on the device: 0); a boolean is one byte; other scalars by value.  The
parameter list is read back from the PTX and checked against this layout before the first
launch, so an ABI change in numba-cuda is an error at compile time, not a wrong result.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import struct
import tempfile
import threading
from pathlib import Path

import numba
import numpy as np
from numba import cuda, types

_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")
_PARAM = re.compile(r"\.param\s+\.(\w+)\s+(?:\.ptr\s+(?:\.\w+\s+)*)?[\w$]+_param_(\d+)")
_PTX_BITS = {"u8": 8, "s8": 8, "b8": 8, "u16": 16, "s16": 16, "b16": 16, "f16": 16, "u32": 32, "s32": 32,
             "b32": 32, "f32": 32, "u64": 64, "s64": 64, "b64": 64, "f64": 64}
_KERNELS_DIR = Path(__file__).resolve().parent


def _sources_digest() -> str:
    """A digest of every kernel source file: a change anywhere invalidates the PTX cache
    (kernels call device functions of other modules)."""
    digest = hashlib.sha256()
    for path in sorted(_KERNELS_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(getattr(numba, "__version__", "").encode())
    try:
        from importlib.metadata import version
        digest.update(version("numba-cuda").encode())
    except Exception:  # noqa: BLE001 - no metadata: the sources alone key the cache
        pass
    return digest.hexdigest()


_SOURCES = None


def cache_dir() -> Path:
    root = os.environ.get("PYCNN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pycnn")
    return Path(root) / "ptx"


# ------------------------------------------------------------------------ signatures

def _layout(a) -> str:
    flags = a.flags
    return "C" if flags.c_contiguous else ("F" if flags.f_contiguous else "A")


def arg_key(a):
    """What decides the compiled specialisation of one argument (cheap: once per call)."""
    dtype = getattr(a, "dtype", None)
    if dtype is not None and hasattr(a, "data") and hasattr(a, "strides") and not isinstance(a, np.generic):
        return (dtype.char, a.ndim, _layout(a))
    if isinstance(a, (bool, np.bool_)):
        return "?"
    if isinstance(a, np.generic):
        return a.dtype.char
    return type(a).__name__


def numba_types(args) -> tuple:
    """The argument types Numba would infer for these (CuPy arrays and scalars)."""
    out = []
    for a in args:
        key = arg_key(a)
        if isinstance(key, tuple):
            out.append(types.Array(numba.from_dtype(a.dtype), a.ndim, key[2]))
        else:
            out.append(numba.typeof(a))
    return tuple(out)


def expected_params(argtypes) -> list[int]:
    """Bits of each PTX parameter under Numba's kernel ABI for ``argtypes``."""
    bits = []
    for t in argtypes:
        if isinstance(t, types.Array):
            bits += [64] * (5 + 2 * t.ndim)  # meminfo, parent, nitems, itemsize, data, shape, strides
        elif t == types.boolean:
            bits.append(8)
        else:
            bits.append(8 * t.bitwidth // 8 if hasattr(t, "bitwidth") else 64)
    return bits


def _scalar_packer(t):
    """How a Python/NumPy scalar is passed for the Numba type ``t``."""
    if t == types.boolean:
        return lambda v: np.uint8(bool(v))
    dtype = np.dtype(str(t)) if isinstance(t, (types.Integer, types.Float)) else None
    if dtype is None:
        raise TypeError(f"kernel argument of type {t} is not supported by the raw launch path")
    return dtype.type


# --------------------------------------------------------------------- compilation

def _closure_key(function) -> str | None:
    """The values a kernel's closure captured (dtype, tile sizes, device functions), as
    text; None when one of them has no stable text (then the PTX is not cached on disk)."""
    parts = []
    for cell in function.__closure__ or ():
        value = cell.cell_contents
        if hasattr(value, "py_func"):  # a device function or kernel of another closure
            inner = _closure_key(value.py_func)
            if inner is None:
                return None
            parts.append(f"{value.py_func.__qualname__}[{inner}]")
        elif isinstance(value, (int, float, str, bool, types.Type)) or value is None:
            parts.append(repr(value))
        else:
            text = repr(value)
            if " at 0x" in text:
                return None
            parts.append(text)
    return ";".join(parts)


def _ptx_for(kernel, argtypes, cc) -> tuple[str, Path | None]:
    """(the PTX, the cache file holding it or None)."""
    global _SOURCES
    function = kernel.py_func
    closure = _closure_key(function)
    options = getattr(kernel, "targetoptions", {}) or {}
    fastmath = bool(options.get("fastmath", False))
    path = None
    if closure is not None:
        if _SOURCES is None:
            _SOURCES = _sources_digest()
        text = "|".join([_SOURCES, function.__module__, function.__qualname__, closure, str(argtypes),
                         str(cc), str(fastmath)])
        path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.ptx"
        if path.is_file():
            return path.read_text(), path
    ptx, _ = cuda.compile_ptx(function, argtypes, cc=cc, fastmath=fastmath)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
                tmp.write(ptx)
            os.replace(tmp.name, path)  # atomic: concurrent processes never read half a file
        except OSError:
            path = None  # a read-only home: compile again next time
    return ptx, path


def check_ptx_params(ptx: str, argtypes) -> str:
    """The entry name of ``ptx``, after checking its parameters against Numba's ABI."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise RuntimeError(f"expected one kernel entry in the PTX, found {len(entries)}")
    params = sorted((int(index), _PTX_BITS.get(kind, 0)) for kind, index in _PARAM.findall(ptx))
    found = [bits for _, bits in params]
    expected = expected_params(argtypes)
    if found != expected:
        raise RuntimeError(f"PTX parameters {found} do not match Numba's kernel ABI {expected} for {argtypes}")
    return entries[0]


_STRUCT_CODES = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
                 "int64": "q", "uint64": "Q", "float32": "f", "float64": "d"}


def _param_codes(argtypes) -> str:
    """struct codes of the kernel parameters: arrays as 5 + 2*ndim int64 fields (the data
    pointer unsigned), booleans as one byte, other scalars as themselves."""
    codes = []
    for t in argtypes:
        if isinstance(t, types.Array):
            codes.append("qqqqQ" + "q" * (2 * t.ndim))
        elif t == types.boolean:
            codes.append("B")
        else:
            codes.append(_STRUCT_CODES[str(t)])
    return "".join(codes)


class RawKernel:
    """One Numba kernel specialised for one signature, launched by CuPy.

    Each launch packs the parameter values into one buffer (``struct.pack_into``, native
    alignment) and hands CuPy a fixed tuple of pointers into it (``CPointer``), so CuPy does
    no per-argument conversion; the driver copies the values at launch, so the buffer is
    reused.  Where CuPy has no ``CPointer``, the values are passed one by one."""

    launches = 0  # every raw launch of the process, for launch counts per training step

    def __init__(self, kernel, args):
        import cupy
        argtypes = numba_types(args)
        cc = tuple(int(d) for d in cupy.cuda.Device().compute_capability)  # '90' -> (9, 0)
        ptx, cached = _ptx_for(kernel, argtypes, cc)
        entry = check_ptx_params(ptx, argtypes)
        # RawModule loads PTX from a file (path=; code= would be compiled as CUDA C++): the
        # cache file itself, else a temporary copy
        if cached is not None:
            module = cupy.RawModule(path=str(cached))
        else:
            with tempfile.TemporaryDirectory() as folder:
                ptx_path = os.path.join(folder, "kernel.ptx")
                with open(ptx_path, "w") as f:
                    f.write(ptx)
                module = cupy.RawModule(path=ptx_path)
        self.function = module.get_function(entry)
        self._module = module
        self._is_array = tuple(isinstance(t, types.Array) for t in argtypes)
        self._packers = tuple(None if isinstance(t, types.Array) else _scalar_packer(t) for t in argtypes)
        self._pointers = None
        try:
            from cupy.cuda.function import CPointer
        except ImportError:
            CPointer = None
        if CPointer is not None and os.environ.get("PYCNN_CUDA_LAUNCH", "raw") != "args":
            codes = _param_codes(argtypes)
            self._format = "@" + codes
            self._buffer = ctypes.create_string_buffer(max(1, struct.calcsize(self._format)))
            base = ctypes.addressof(self._buffer)
            offsets = [struct.calcsize("@" + codes[:i + 1]) - struct.calcsize("@" + codes[i])
                       for i in range(len(codes))]
            self._pointers = tuple(CPointer(base + offset) for offset in offsets)
            self._lock = threading.Lock()

    def _values(self, args) -> list:
        flat = []
        for is_array, packer, a in zip(self._is_array, self._packers, args):
            if is_array:
                flat += (0, 0, a.size, a.itemsize, a.data.ptr)
                flat += a.shape
                flat += a.strides
            else:
                flat.append(packer(a))
        return flat

    def __call__(self, grid, block, args) -> None:
        RawKernel.launches += 1
        values = self._values(args)
        if self._pointers is None:
            self.function(grid, block, tuple(values))
            return
        with self._lock:
            struct.pack_into(self._format, self._buffer, 0, *values)
            self.function(grid, block, self._pointers)


_compiled: dict = {}


def launch_count() -> int:
    """Kernels launched through the raw path so far in this process."""
    return RawKernel.launches


def compiled(kernel, args) -> RawKernel:
    """The RawKernel of ``kernel`` for the signature of ``args`` (compiled on first use);
    call it as ``raw(grid, block, args)`` to launch on CuPy's current stream."""
    key = (kernel, tuple(arg_key(a) for a in args))
    raw = _compiled.get(key)
    if raw is None:
        raw = _compiled[key] = RawKernel(kernel, args)
    return raw
