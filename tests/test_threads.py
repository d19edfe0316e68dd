"""Thread hygiene: pycnn limits NumPy's BLAS to one thread inside its matmuls (and only
there), sets no environment variable, and reports its thread pools with pycnn.threads()."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import _threads
from pycnn.autograd import Context
from pycnn.ops import registry

threadpoolctl = pytest.importorskip("threadpoolctl")


def numpy_blas_threads() -> list[int]:
    """The thread limit of each BLAS library NumPy uses, as threadpoolctl reads it now."""
    return [lib.get_num_threads() for lib in _threads._numpy_blas_controllers()]


@pytest.fixture
def blas_two_threads():
    """NumPy's BLAS set to 2 threads for the test (so that a limit to 1 is visible)."""
    if not _threads._numpy_blas_controllers():
        pytest.skip("no BLAS library found by threadpoolctl")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if min(numpy_blas_threads()) < 2:
            pytest.skip("this BLAS cannot run on 2 threads here")
        yield


class Probe(np.ndarray):
    """An array that records NumPy's BLAS thread limits whenever it takes part in a matmul."""
    seen: list = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            Probe.seen.append(numpy_blas_threads())
        inputs = tuple(np.asarray(x) if isinstance(x, Probe) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)


def test_linear_runs_single_threaded_blas_and_restores_the_limit(blas_two_threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    w = rng.standard_normal((10, 300)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    backend, _, impl = registry.get("linear").resolve([x, w, b], {})   # what F.linear runs here
    assert backend in ("cpp", "numpy")
    Probe.seen = []
    ctx = Context((True, True, True))
    impl.forward(ctx, x.view(Probe), w.view(Probe), b)
    impl.backward(ctx, np.ones((64, 10), np.float32).view(Probe))
    assert len(Probe.seen) == 3                      # x @ w.T, grad @ w, grad.T @ x
    assert all(limits == [1] * len(limits) for limits in Probe.seen), Probe.seen
    assert min(numpy_blas_threads()) == 2            # restored after each matmul block


def test_linear_results_identical_to_multithreaded_blas(blas_two_threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 512)).astype(np.float32)
    w = rng.standard_normal((384, 512)).astype(np.float32)
    b = rng.standard_normal(384).astype(np.float32)
    g = rng.standard_normal((256, 384)).astype(np.float32)
    xt, wt, bt = pycnn.Tensor(x, requires_grad=True), pycnn.Tensor(w, requires_grad=True), pycnn.Tensor(b)
    y = F.linear(xt, wt, bt)
    (y * pycnn.Tensor(g)).sum().backward()
    np.testing.assert_array_equal(y.data, x @ w.T + b)       # multi-threaded BLAS out here
    np.testing.assert_array_equal(xt.grad, g @ w)
    np.testing.assert_array_equal(wt.grad, g.T @ x)


def test_blas_limit_nests_and_is_restored_after_an_exception(blas_two_threads):
    a = np.zeros(3)
    with pytest.raises(RuntimeError):
        with _threads.blas_single_threaded(a):
            with _threads.blas_single_threaded(a):
                assert numpy_blas_threads() == [1] * len(numpy_blas_threads())
            assert numpy_blas_threads() == [1] * len(numpy_blas_threads())   # inner exit keeps it
            raise RuntimeError("boom")
    assert min(numpy_blas_threads()) == 2 and _threads._depth == 0


def test_blas_limit_counts_blocks_open_in_two_threads(blas_two_threads):
    a = np.zeros(3)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def other():
        with _threads.blas_single_threaded(a):
            entered.set()
            release.wait(10)
        seen["after other"] = numpy_blas_threads()

    with _threads.blas_single_threaded(a):
        t = threading.Thread(target=other)
        t.start()
        assert entered.wait(10)
    seen["main left, other inside"] = numpy_blas_threads()
    release.set()
    t.join(10)
    assert seen["main left, other inside"] == [1] * len(seen["main left, other inside"])
    assert min(seen["after other"]) == 2


def test_blas_limit_leaves_non_numpy_arrays_alone(blas_two_threads):
    class Device:  # stands in for a CuPy array
        __cuda_array_interface__ = {}
    with _threads.blas_single_threaded(np.zeros(2), Device()):
        assert min(numpy_blas_threads()) == 2


def test_threads_report(blas_two_threads):
    report = pycnn.threads()
    C = pycnn.device.cpp_extension()
    if C is not None:
        assert report["openmp"]["num_threads"] == C.num_threads()
        assert any("omp" in os.path.basename(p) for p in report["openmp"]["runtimes"])
    assert report["blas"], "NumPy's BLAS should be found"
    for lib in report["blas"]:
        assert lib["num_threads_in_pycnn_ops"] == 1
        assert lib["num_threads"] == 2 and lib["num_threads_outside_pycnn"] == 2 and not lib["limited_now"]
    with _threads.blas_single_threaded(np.zeros(1)):
        inside = pycnn.threads()["blas"]
    assert all(lib["num_threads"] == 1 and lib["limited_now"] and lib["num_threads_outside_pycnn"] == 2
               for lib in inside)
    json.dumps(report)  # plain data
    assert "OpenMP" in str(report) and "BLAS" in str(report)


def test_threads_report_counts_loader_threads():
    from pycnn import data
    images = np.zeros((8, 1, 4, 4), np.uint8)
    loader = data.DataLoader((images, np.zeros(8, np.int64)), batch_size=2, prefetch=1)
    batches = iter(loader)
    next(batches)
    assert pycnn.threads()["loader"]["threads"] >= 1
    batches.close()
    assert pycnn.threads()["loader"]["threads"] == 0


PROBE = (
    "import os, json, sys, numpy as np\n"
    "if sys.argv[1:] == ['torch-first']:\n"
    "    import torch\n"
    "before = dict(os.environ)\n"
    "import pycnn, pycnn.functional as F\n"
    "x = pycnn.Tensor(np.ones((2, 3, 8, 8), np.float32))\n"
    "w = pycnn.Tensor(np.ones((4, 3, 3, 3), np.float32), requires_grad=True)\n"
    "F.relu(F.conv3x3(x, w)).sum().backward()\n"
    "F.linear(pycnn.Tensor(np.ones((2, 5), np.float32)), pycnn.Tensor(np.ones((3, 5), np.float32)))\n"
    "report = pycnn.threads()\n"
    "after = dict(os.environ)\n"
    "print(json.dumps({'changed': sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),"
    " 'openmp': report['openmp']}))\n")


def run_probe(env_extra=None, *args):
    """Run PROBE in a fresh interpreter without OpenMP variables (plus ``env_extra``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pycnn_sets_no_environment_variable():
    """Importing pycnn and running kernels leaves os.environ as it was (a library loaded
    later, or a child process, reads nothing of ours); pycnn's spin count reached libgomp
    only while the extension loaded."""
    result = run_probe()
    assert result["changed"] == []
    omp = result["openmp"]
    if omp["num_threads"] is None or not omp["runtimes"]:
        pytest.skip("no C++ extension / OpenMP runtime")
    chosen = omp["set_by_pycnn_at_start"]
    assert chosen in ({"GOMP_SPINCOUNT": str(_threads.SPIN_COUNT)}, {"GOMP_SPINCOUNT": str(_threads.BUSY_SPIN_COUNT)})
    assert omp["env_at_start"] == chosen
    assert "pycnn's choice: load average" in omp["wait_policy"]


def test_spin_count_follows_the_load(monkeypatch):
    monkeypatch.setattr(_threads, "_available_cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.9, 1.0, 1.0))
    assert _threads.choose_spin_count()[0] == _threads.SPIN_COUNT
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 1.0, 1.0))
    assert _threads.choose_spin_count()[0] == _threads.BUSY_SPIN_COUNT
    assert _threads.SPIN_COUNT > 0 and _threads.BUSY_SPIN_COUNT == 0


def test_users_openmp_setting_wins():
    result = run_probe({"OMP_WAIT_POLICY": "passive"})
    assert result["changed"] == []
    omp = result["openmp"]
    if omp["num_threads"] is None or not omp["runtimes"]:
        pytest.skip("no C++ extension / OpenMP runtime")
    assert omp["set_by_pycnn_at_start"] == {}
    assert omp["env_at_start"] == {"OMP_WAIT_POLICY": "passive"}
    assert "passive" in omp["wait_policy"]


def test_runtime_started_by_torch_is_left_alone():
    pytest.importorskip("torch")
    result = run_probe(None, "torch-first")
    assert result["changed"] == []
    omp = result["openmp"]
    if omp["num_threads"] is None:
        pytest.skip("no C++ extension")
    assert omp["set_by_pycnn_at_start"] == {}      # torch's libgomp serves pycnn._C too
    assert "another library" in omp["origin"]


def test_side_by_side_variant_parsing():
    pytest.importorskip("bench.side_by_side")
    from bench.side_by_side import _parse_variant
    v = _parse_variant("passive:OMP_WAIT_POLICY=passive,GOMP_SPINCOUNT=0")
    assert v["label"] == "passive" and v["env"] == {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "0"}
    assert _parse_variant("old:path=/tmp/x")["path"] == os.path.abspath("/tmp/x")
    with pytest.raises(argparse.ArgumentTypeError):
        _parse_variant("nolabel")
