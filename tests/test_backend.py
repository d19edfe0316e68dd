"""Routing (pycnn/ops/routing.py): the device follows the array, use_backend / PYCNN_BACKEND
force a backend, and nothing falls back silently."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import _threads, nn
from pycnn import device as _device
from pycnn.ops import registry, routing


def _relu_backend():
    return registry.get("relu").resolve((np.zeros(3, np.float32),), {})[0]


def test_use_backend_forces_and_restores():
    assert routing.forced_backend() is None
    with pycnn.use_backend("numpy"):
        assert routing.forced_backend() == "numpy"
        backend, algo, _ = registry.get("relu").resolve((np.zeros(3, np.float32),), {})
        assert (backend, algo) == ("numpy", "reference")
    assert routing.forced_backend() is None
    assert pycnn.use_backend is routing.use_backend


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        with pycnn.use_backend("tpu"):
            pass


def _run_with_environment(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          timeout=120)


def test_environment_variable_is_read_once_at_import():
    code = ("import os, numpy as np, pycnn; from pycnn.ops import registry\n"
            "os.environ['PYCNN_BACKEND'] = 'cpp'  # too late: read at import\n"
            "print(registry.get('relu').resolve((np.zeros(3, np.float32),), {})[0])")
    result = _run_with_environment(code, PYCNN_BACKEND="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"
    bad = _run_with_environment("import numpy as np, pycnn.functional as F; F.relu(np.zeros(2, np.float32))",
                                PYCNN_BACKEND="opencl")
    assert bad.returncode != 0 and "PYCNN_BACKEND must be one of" in bad.stderr


def test_host_arrays_use_the_cpp_backend_where_built():
    assert _relu_backend() == ("cpp" if _device.cpp_extension() is not None else "numpy")


def test_forced_backend_without_the_op_is_an_error(monkeypatch):
    op = registry.get("relu")
    for key in [key for key in op.impls if key[0] == "cpp"]:
        monkeypatch.delitem(op.impls, key)
    monkeypatch.setattr(registry, "_backends_loaded", registry._backends_loaded | {"cpp"})
    with pycnn.use_backend("cpp"):
        with pytest.raises(routing.NoImplementation, match=r"relu: backend 'cpp' \(forced by use_backend or "
                                                           r"PYCNN_BACKEND\) does not implement this op"):
            F.relu(np.zeros(3, np.float32))


def test_a_whole_training_graph_runs_on_a_forced_cpp_backend():
    pytest.importorskip("pycnn._C")
    net = nn.Sequential(nn.Conv3x3(2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    with pycnn.use_backend("cpp"), pycnn.profile() as timings:
        F.softmax_cross_entropy(net(x), np.array([0, 1])).backward()
    assert {backend for (_, backend, _, _) in timings.calls} == {"cpp"}


def test_an_implementation_that_cannot_take_the_call():
    """C++ maxout keeps each winner in a uint8: forced, more than 256 pieces is an error;
    with auto the router runs the reference, and the profile says so."""
    pytest.importorskip("pycnn._C")
    x = np.random.default_rng(0).standard_normal((1, 300, 2)).astype(np.float32)
    with pycnn.use_backend("cpp"):
        with pytest.raises(routing.CannotRun, match="maxout: backend 'cpp' cannot run this call .*256 pieces"):
            F.maxout(x, 300)
    with pycnn.profile() as timings:
        y = F.maxout(x, 300)
    assert set(timings.calls) == {("maxout", "numpy", "reference", "forward")}
    np.testing.assert_array_equal(y.numpy(), x.max(axis=1, keepdims=True))


def test_cuda_backend_refuses_host_arrays(monkeypatch):
    monkeypatch.setattr(routing, "cuda_simulated", lambda: False)
    with pycnn.use_backend("cuda"):
        with pytest.raises(TypeError, match="needs CUDA arrays"):
            F.relu(np.zeros(3, np.float32))


def test_missing_extension_warns_once_and_runs_the_reference(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "pycnn" and fromlist and "_C" in fromlist:
            raise ImportError("simulated: not built")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(_threads, "_extension", None)
    monkeypatch.setattr(_threads, "_extension_checked", False)
    monkeypatch.setattr(builtins, "__import__", no_extension)
    monkeypatch.delitem(sys.modules, "pycnn._C", raising=False)
    with pytest.warns(RuntimeWarning, match="not available"):
        assert _device.cpp_extension() is None
    assert _device.cpp_extension() is None  # the second call is silent
    assert _relu_backend() == "numpy"


def test_named_algorithm_must_exist():
    op = registry.get("conv3x3")
    with pytest.raises(ValueError, match="choose one of"):
        op.resolve((np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.float32), None), {}, "nope")


def test_auto_tries_the_backends_own_choice_first():
    pytest.importorskip("pycnn._C")
    op = registry.get("conv3x3")
    small = (np.zeros((1, 3, 4, 4), np.float32), np.zeros((4, 3, 3, 3), np.float32), None)
    wide = (np.zeros((1, 32, 4, 4), np.float32), np.zeros((32, 32, 3, 3), np.float32), None)
    assert op.resolve(small, {})[:2] == ("cpp", "direct")
    assert op.resolve(wide, {})[:2] == ("cpp", "winograd")
