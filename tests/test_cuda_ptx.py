"""Every Numba-CUDA kernel compiles for a GPU: each cuda wrapper runs on NumPy arrays with
its launches replaced by ``cuda.compile_ptx`` (sm_90), which needs NVVM but no GPU and no
driver; float32 kernels must stay in float32, every kernel's parameters fit in 4 KB (the
multi-tensor optimizer kernels pass up to 20 tensors by value), and (where nvJitLink is
installed) no kernel may spill registers to local memory.  The ops and samples are those
of the registry (tests/test_cuda_backend.py: every op with kernels).

    PYTHONPATH=. python tests/test_cuda_ptx.py --compile-ptx      (what the test runs)
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pycnn
from pycnn.autograd import Context
from pycnn.ops import registry
from tests.test_cuda_backend import CUDA_OPS, DTYPES, HAVE_NUMBA_CUDA, cuda_backend

NO_NVVM_EXIT = 3
KERNEL_MODULES = ("conv3x3", "conv_gemm", "conv_igemm", "batchnorm", "pool", "activations", "dropout", "reduce", "rng",
                  "fancy_pca", "optim", "loss")
# portable ops with a kernel of their own besides the reference (not in CUDA_OPS)
OWN_KERNELS = (("softmax_cross_entropy", "kernel"),)


def _compile_all_kernels_to_ptx() -> None:
    """Run every cuda wrapper on NumPy arrays with the launches replaced by
    ``cuda.compile_ptx`` (sm_90): needs NVVM, no GPU and no driver.  Fails on a typing or
    lowering error, or on a float64 instruction in a float32 kernel."""
    import types

    cuda_backend().kernels_package()  # before numba.cuda: the NumPy 2.5 import fix lives there
    import numba
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        print("NVVM is not available")
        sys.exit(NO_NVVM_EXIT)
    try:  # compile_ptx also asks NVRTC which architectures it supports
        from numba.cuda.cudadrv import nvrtc
        nvrtc.get_supported_ccs()
    except Exception as exc:  # noqa: BLE001 - any failure to load the library means: not available
        print(f"NVRTC is not available: {exc}")
        sys.exit(NO_NVVM_EXIT)

    # device functions are compiled for the current device: say it is an sm_90 without a driver
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    cb = cuda_backend()
    compiled = {}
    kernels_seen = set()

    from pycnn.kernels import _rawlaunch

    def compile_instead_of_launch(kernel, grid, block, like, *args):
        signature = tuple(numba.typeof(a) for a in args)
        # module.qualname: kernels of different modules may share a name (forward, backward);
        # builds of one kernel that differ by more than the dtype (conv_igemm's tensor cores)
        # are told apart by what their PTX runs on
        name = f"{kernel.py_func.__module__.rsplit('.', 1)[-1]}.{kernel.py_func.__qualname__}"
        if (name, signature, id(kernel)) not in kernels_seen:
            kernels_seen.add((name, signature, id(kernel)))
            ptx = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))[0]
            key = (name + (" [tensor cores]" if "mma.sync" in ptx else ""), signature)
            compiled[key] = ptx
            # the raw launch path infers the same types and packs what this PTX declares
            raw_types = _rawlaunch.numba_types(args)
            assert [str(t) for t in raw_types] == [str(t).replace(", readonly", "") for t in signature], key
            _rawlaunch.check_ptx_params(ptx, raw_types)
            # CUDA's classic parameter limit (ptxas for sm_90 allows 32 KB, older drivers 4 KB)
            param_bytes = struct.calcsize("@" + _rawlaunch._param_codes(raw_types))
            assert param_bytes <= 4096, (key, param_bytes)

    for name in KERNEL_MODULES:
        cb.kernel_module(name).launch = compile_instead_of_launch
    cb.kernel_module("tensor_cores").check_device = lambda: None  # asks the driver; compiled for sm_90
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        routes = [(name, algo) for name in CUDA_OPS for algo in registry.get(name).algorithms("cuda")]
        for name, algo in routes + list(OWN_KERNELS):
            op = registry.get(name)
            impl = op.impls[("cuda", algo)]
            for sample in op.samples(rng, np.dtype(dtype)):
                ctx = Context(tuple(x is not None for x in sample.inputs))
                y = impl.forward(ctx, *sample.inputs, **sample.params)
                impl.backward(ctx, np.ones(y.shape, y.dtype))
        images = np.ones((2, 3, 4, 4), dtype)
        cb.kernel_module("fancy_pca").fancy_pca_apply(images, np.eye(3), np.ones(3), np.ones((2, 3)))
        cb.kernel_module("fancy_pca").rgb_moments(images)
        cb.kernel_module("rng").uniform(3, np.empty(5, dtype))
        ones = np.ones(5, dtype)
        cb.kernel_module("optim").sgd_step(ones, ones, ones, 0.1, 0.9, 0.01, True, False)
        cb.kernel_module("optim").sgd_step(ones, ones, None, 0.1, 0.0, 0.01, False, False)
        cb.kernel_module("optim").adam_step(ones, ones, ones, ones, 1e-3, 0.9, 0.999, 1e-8, 0.0, 2)
        # the multi-tensor kernels: every slot's parameters must fit CUDA's 4 KB (ptxas checks)
        cb.kernel_module("optim").sgd_multi_step([(ones, ones, ones, 0.1, 0.01, False)], 0.9, True)
        cb.kernel_module("optim").sgd_multi_step([(ones, ones, None, 0.1, 0.01, False)], 0.0, False)
        cb.kernel_module("optim").adam_multi_step([(ones, ones, ones, ones, 1e-3, 0.0, 2)], 0.9, 0.999, 1e-8)
        cb.kernel_module("optim").sum_squares_and_abs([ones])
    promoted = [qualname for (qualname, signature), ptx in compiled.items()
                if "moments" not in qualname and ".f64" in ptx
                and all(getattr(a, "dtype", a) != numba.float64 for a in signature)]
    assert not promoted, f"float64 instructions in float32 kernels: {promoted}"
    print(f"{len(compiled)} kernel specialisations compiled to PTX")
    resources = {key: _ptxas_resources(ptx) for key, ptx in compiled.items()}
    if any(r is None for r in resources.values()):
        print("nvJitLink is not available: no register/spill report")
        return
    rows = sorted((qualname, str(signature[0].dtype) if hasattr(signature[0], "dtype") else "-", r)
                  for (qualname, signature), r in resources.items())
    lines = ["| kernel | dtype | registers | stack bytes | spill stores | shared bytes |",
             "|---|---|---:|---:|---:|---:|"]
    seen = set()
    for qualname, dtype, r in rows:
        if (qualname, dtype) not in seen:
            seen.add((qualname, dtype))
            name = f"{qualname.split('.')[0]}.{qualname.split('.')[-1]}"
            cells = (name, dtype, r["registers"], r["stack"], r["spill_stores"], r["shared"])
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    report = "\n".join(lines)
    print(report)
    if os.environ.get("PYCNN_PTX_REPORT"):
        Path(os.environ["PYCNN_PTX_REPORT"]).write_text(report + "\n")
    spilled = [(q, r) for (q, _), r in resources.items() if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"kernels that spill registers to local memory: {spilled}"


def _ptxas_resources(ptx: str) -> dict | None:
    """Registers, stack, spills and static shared memory of a PTX kernel on sm_90, from
    nvJitLink's verbose log (ptxas); None when nvJitLink is not installed."""
    import re
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return None
    data = ptx.encode()
    handle = nvjitlink.create(2, [b"-arch=sm_90", b"-verbose"])
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")

    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0
    return {"registers": number(r"Used (\d+) registers"), "stack": number(r"(\d+) bytes stack frame"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads"),
            "shared": number(r"(\d+) bytes smem")}


def test_kernels_compile_to_ptx():
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(pycnn.__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, __file__, "--compile-ptx"], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode == NO_NVVM_EXIT:
        pytest.skip("NVVM or NVRTC is not available (pip install 'numba-cuda[cu13]')")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]


if __name__ == "__main__" and sys.argv[1:] == ["--compile-ptx"]:
    _compile_all_kernels_to_ptx()
