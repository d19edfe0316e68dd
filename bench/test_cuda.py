"""GPU benchmarks of the cuda backend: pycnn's Numba-CUDA kernels vs PyTorch CUDA vs the
array-generic references run by CuPy, and vs the device-to-device copy limit.

    pytest bench/test_cuda.py --benchmark-only -s        (needs a GPU, CuPy, numba-cuda)

Skips without a real GPU (the simulator is far too slow to time anything).  Every case
checks pycnn's result against the CuPy reference first, warms up (so JIT compilation is
never timed) and synchronises the device inside the timed function, so the clock reads
finished work.  The cases are the GPU ``bench`` cases of the op specs (pycnn/ops/*.py), with
their inputs, params and torch forms.  Each case prints one line: median ms, GB/s and
GFLOP/s (the spec's cost model, ``Op.cost``: forward, or forward + backward), and for pycnn
the fraction of the copy bandwidth (a cupy copy of as many bytes as the op moves).
"""
from __future__ import annotations

import numpy as np
import pytest

from pycnn.ops import routing

pytest.importorskip("pytest_benchmark")
if routing.cuda_simulated():
    pytest.skip("no timing in the CUDA simulator", allow_module_level=True)
cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no CUDA device")
except Exception as exc:  # no driver, no device
    pytest.skip(f"needs a CUDA GPU: {exc}", allow_module_level=True)
pytest.importorskip("numba")
from pycnn.ops import cuda_backend  # noqa: E402

cuda_backend.kernels_package()  # before numba.cuda: the NumPy 2.5 import fix lives there
pytest.importorskip("numba.cuda")

import os  # noqa: E402

import pycnn  # noqa: E402
from pycnn.autograd import Context  # noqa: E402
from pycnn.bench import measure  # noqa: E402
from pycnn.ops import registry  # noqa: E402

ROUNDS, WARMUP = 30, 5
PHASES = registry.PHASES

# (op, index into its spec's bench): every GPU case of every spec, float32.  PyTorch runs the
# convolutions in plain FP32 (TF32 off) unless PYCNN_BENCH_TF32=1.
CASES = [(op.name, i) for op in registry.all_ops() for i, case in enumerate(op.bench) if case.where == "gpu"]


def _case_id(case):
    name, index = case
    return f"{name}-{'x'.join(map(str, registry.get(name).bench[index].shapes[0]))}"


def _host_case(case):
    """(op, shapes, host inputs, params) of a case, from the spec."""
    name, index = case
    op = registry.get(name)
    spec = op.bench[index]
    inputs, params = op.bench_inputs(np.random.default_rng(0), spec.shapes, dict(spec.params))
    return op, spec.shapes, inputs, params


def _device_case(case):
    """(op, shapes, CuPy inputs, params) of a case."""
    op, shapes, host, params = _host_case(case)
    return op, shapes, [None if a is None else cupy.asarray(a) for a in host], params


def _sync():
    cupy.cuda.get_current_stream().synchronize()


def _bench(benchmark, fn):
    """Time fn() + a device synchronisation, after warm-up calls (JIT compilation, caches)."""
    def timed():
        fn()
        _sync()
    for _ in range(WARMUP):
        timed()
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    return benchmark.stats.stats.median if getattr(benchmark, "stats", None) else None


def _copy_seconds(nbytes):
    """Median seconds of a device-to-device copy moving ``nbytes`` (half read, half written)."""
    src = cupy.ones(max(1, nbytes // 8), dtype=cupy.float32)
    dst = cupy.empty_like(src)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for i in range(WARMUP + ROUNDS):
        start.record()
        cupy.copyto(dst, src)
        end.record()
        end.synchronize()
        if i >= WARMUP:
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times))


def _report(capsys, benchmark, label, name, phase, shapes, params, seconds, with_limit=False):
    if seconds is None:  # --benchmark-disable
        return
    flops, nbytes = registry.get(name).cost(phase, shapes, params)  # the spec's model, forward and backward
    line = (f"{name:<11}{phase:<8}{label:<7}{str(shapes[0]):<18}{seconds * 1e3:9.3f} ms "
            f"{nbytes / seconds / 1e9:8.1f} GB/s {flops / seconds / 1e9:9.1f} GFLOP/s")
    if with_limit:
        line += f"   {_copy_seconds(int(nbytes)) / seconds:5.2f} of copy bandwidth"
    benchmark.extra_info.update(op=name, phase=phase, impl=label, ms=seconds * 1e3,
                                gb_per_s=nbytes / seconds / 1e9, gflop_per_s=flops / seconds / 1e9)
    with capsys.disabled():
        print(line)


def _run_registry(impl, inputs, params, grad, phase):
    ctx = Context(tuple(x is not None for x in inputs))
    y = impl.forward(ctx, *inputs, **params)
    if phase != "fwd":
        impl.backward(ctx, grad)
    return y


@pytest.mark.gpu
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pycnn_cuda(benchmark, capsys, case, phase):
    op, shapes, inputs, params = _device_case(case)
    with pycnn.use_backend("cuda"):
        backend, _, impl = op.resolve(inputs, params)
    assert backend == "cuda"
    # correct first: against the reference run by CuPy
    y = _run_registry(impl, inputs, params, None, "fwd")
    expected = op.reference.forward(Context((False,) * len(inputs)), *inputs, **params)
    np.testing.assert_allclose(cupy.asnumpy(y), cupy.asnumpy(expected), rtol=1e-4, atol=1e-4)
    grad = cupy.ones_like(y)
    seconds = _bench(benchmark, lambda: _run_registry(impl, inputs, params, grad, phase))
    _report(capsys, benchmark, "pycnn", op.name, phase, shapes, params, seconds, with_limit=True)


@pytest.mark.gpu
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cupy_reference(benchmark, capsys, case, phase):
    op, shapes, inputs, params = _device_case(case)
    grad = cupy.ones_like(op.reference.forward(Context((False,) * len(inputs)), *inputs, **params))
    seconds = _bench(benchmark, lambda: _run_registry(op.reference, inputs, params, grad, phase))
    _report(capsys, benchmark, "cupy", op.name, phase, shapes, params, seconds)


@pytest.mark.gpu
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_cuda(benchmark, capsys, case, phase):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA")
    op, shapes, host, params = _host_case(case)
    tf32 = os.environ.get("PYCNN_BENCH_TF32") == "1"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    forward, _ = measure.torch_runner(torch, op, "fwd", host, params, np.zeros(1, np.float32), device="cuda")
    y_shape = tuple(forward()[0].shape)
    run, _ = measure.torch_runner(torch, op, phase, host, params, np.ones(y_shape, np.float32), device="cuda")

    def step():
        run()
        torch.cuda.synchronize()
    seconds = _bench(benchmark, step)
    _report(capsys, benchmark, "torch", op.name, phase, shapes, params, seconds)


CONV_CASES = [case for case in CASES if case[0] in ("conv3x3", "conv3x3_act")]


@pytest.mark.gpu
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
@pytest.mark.parametrize("algo", ["igemm", "igemm_tf32"])
def test_pycnn_cuda_conv_algorithm(benchmark, capsys, case, phase, algo):
    """The conv algorithms besides the default (gemm), for choosing the default on a GPU;
    igemm_tf32 against PyTorch's TF32 convolution and against igemm (its FP32 build)."""
    op, shapes, inputs, params = _device_case(case)
    with pycnn.use_backend("cuda"):
        backend, _, impl = op.resolve(inputs, params, algo)
    assert backend == "cuda"
    y = _run_registry(impl, inputs, params, None, "fwd")
    expected = op.reference.forward(Context((False,) * len(inputs)), *inputs, **params)
    tolerance = 3e-3 if algo.endswith("tf32") else 1e-4  # TF32: 11 significant bits per operand
    np.testing.assert_allclose(cupy.asnumpy(y), cupy.asnumpy(expected), rtol=tolerance, atol=tolerance)
    grad = cupy.ones_like(y)
    seconds = _bench(benchmark, lambda: _run_registry(impl, inputs, params, grad, phase))
    _report(capsys, benchmark, algo, op.name, phase, shapes, params, seconds)
