"""GPU benchmarks of the cuda backend: pycnn's Numba-CUDA kernels vs PyTorch CUDA vs the
array-generic references run by CuPy, and vs the device-to-device copy limit.

    pytest bench/test_cuda.py --benchmark-only -s        (needs a GPU, CuPy, numba-cuda)

Skips without a real GPU (the simulator is far too slow to time anything).  Every case
checks pycnn's result against the CuPy reference first, warms up (so JIT compilation is
never timed) and synchronises the device inside the timed function, so the clock reads
finished work.  Each case prints one line: median ms, GB/s (the op's byte count from the
registry, ``op.bytes``) and GFLOP/s (``op.flops``), and for pycnn the fraction of the
copy bandwidth (a cupy copy of as many bytes as the op moves: 1 read + 1 write).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
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

import pycnn  # noqa: E402
from pycnn.autograd import Context  # noqa: E402
from pycnn.ops import registry  # noqa: E402

ROUNDS, WARMUP = 30, 5
PHASES = ("fwd", "fwd+bwd")

# (op, inputs as host-array shapes (None: absent), params); float32.  The convolutions are
# the README net's at CIFAR-10 size; PyTorch runs them in plain FP32 (TF32 off) unless
# PYCNN_BENCH_TF32=1.
N = 256
CASES = [
    ("conv3x3", [(N, 3, 32, 32), (32, 3, 3, 3), (32,)], {}),
    ("conv3x3", [(N, 32, 32, 32), (32, 32, 3, 3), (32,)], {}),
    ("conv3x3", [(N, 64, 16, 16), (64, 64, 3, 3), (64,)], {}),
    ("conv3x3", [(N, 128, 8, 8), (128, 128, 3, 3), (128,)], {}),
    ("batchnorm", [(N, 32, 32, 32), (32,), (32,)], {}),
    ("maxpool2x2", [(N, 64, 32, 32)], {}),
    ("avgpool2x2", [(N, 64, 32, 32)], {}),
    ("relu", [(N, 64, 32, 32)], {}),
    ("leaky_relu", [(N, 64, 32, 32)], {"slope": 0.01}),
    ("prelu", [(N, 64, 32, 32), (64,)], {}),
    ("rrelu", [(N, 64, 32, 32)], {"training": True, "seed": 1}),
    ("elu", [(N, 64, 32, 32)], {"alpha": 1.0}),
    ("sigmoid", [(N, 64, 32, 32)], {}),
    ("tanh", [(N, 64, 32, 32)], {}),
    ("maxout", [(N, 64, 32, 32)], {"pieces": 2}),
    ("dropout", [(N, 64, 32, 32)], {"p": 0.5, "seed": 1}),
]


def _torch_fn(name, params):
    """The PyTorch equivalent of an op (torch.nn.functional), or None."""
    import torch.nn.functional as tf
    return {
        "conv3x3": lambda x, w, b: tf.conv2d(x, w, b, padding=1),
        "batchnorm": lambda x, g, b: tf.batch_norm(x, None, None, g, b, training=True),
        "maxpool2x2": lambda x: tf.max_pool2d(x, 2),
        "avgpool2x2": lambda x: tf.avg_pool2d(x, 2),
        "relu": tf.relu,
        "leaky_relu": lambda x: tf.leaky_relu(x, params.get("slope", 0.01)),
        "prelu": tf.prelu,
        "rrelu": lambda x: tf.rrelu(x, 1 / 8, 1 / 3, training=True),  # slopes 1/U(3, 8) ~ U(1/8, 1/3)
        "elu": lambda x: tf.elu(x, params.get("alpha", 1.0)),
        "sigmoid": lambda x: x.sigmoid(),
        "tanh": lambda x: x.tanh(),
        "maxout": lambda x: x.view(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:]).amax(dim=2),
        "dropout": lambda x: tf.dropout(x, params.get("p", 0.5), training=True),
    }.get(name)


def _case_id(case):
    name, shapes, _ = case
    return f"{name}-{'x'.join(map(str, shapes[0]))}"


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
    op = registry.get(name)
    present = [s for s in shapes if s is not None]
    # fwd+bwd, estimated from the forward's counts: bytes x 2.5 (a map: forward reads x and
    # writes y, backward reads x and grad and writes grad_x: 5 arrays instead of 2); FLOPs x 3
    # (conv: the input and the weight gradients each cost one forward)
    nbytes = op.bytes(*present, itemsize=4, **params) * (1 if phase == "fwd" else 2.5)
    flops = op.flops(*present, **params) * (1 if phase == "fwd" else 3)
    line = (f"{name:<11}{phase:<8}{label:<7}{str(shapes[0]):<18}{seconds * 1e3:9.3f} ms "
            f"{nbytes / seconds / 1e9:8.1f} GB/s {flops / seconds / 1e9:9.1f} GFLOP/s")
    if with_limit:
        line += f"   {_copy_seconds(int(nbytes)) / seconds:5.2f} of copy bandwidth"
    benchmark.extra_info.update(op=name, phase=phase, impl=label, ms=seconds * 1e3,
                                gb_per_s=nbytes / seconds / 1e9, gflop_per_s=flops / seconds / 1e9)
    with capsys.disabled():
        print(line)


def _host_inputs(shapes, rng):
    return [None if s is None else rng.standard_normal(s).astype(np.float32) for s in shapes]


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
    name, shapes, params = case
    op = registry.get(name)
    host = _host_inputs(shapes, np.random.default_rng(0))
    inputs = [None if a is None else cupy.asarray(a) for a in host]
    with pycnn.use_backend("cuda"):
        backend, _, impl = op.resolve(inputs, params)
    assert backend == "cuda"
    # correct first: against the reference run by CuPy
    y = _run_registry(impl, inputs, params, None, "fwd")
    expected = op.reference.forward(Context((False,) * len(inputs)), *inputs, **params)
    np.testing.assert_allclose(cupy.asnumpy(y), cupy.asnumpy(expected), rtol=1e-4, atol=1e-4)
    grad = cupy.ones_like(y)
    seconds = _bench(benchmark, lambda: _run_registry(impl, inputs, params, grad, phase))
    _report(capsys, benchmark, "pycnn", name, phase, shapes, params, seconds, with_limit=True)


@pytest.mark.gpu
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cupy_reference(benchmark, capsys, case, phase):
    name, shapes, params = case
    op = registry.get(name)
    inputs = [None if a is None else cupy.asarray(a) for a in _host_inputs(shapes, np.random.default_rng(0))]
    y = op.reference.forward(Context((False,) * len(inputs)), *inputs, **params)
    grad = cupy.ones_like(y)
    seconds = _bench(benchmark, lambda: _run_registry(op.reference, inputs, params, grad, phase))
    _report(capsys, benchmark, "cupy", name, phase, shapes, params, seconds)


@pytest.mark.gpu
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_cuda(benchmark, capsys, case, phase):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA")
    name, shapes, params = case
    tf32 = os.environ.get("PYCNN_BENCH_TF32") == "1"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    fn = _torch_fn(name, params)
    host = _host_inputs(shapes, np.random.default_rng(0))
    tensors = [None if a is None else torch.as_tensor(a, device="cuda").requires_grad_(phase != "fwd")
               for a in host]
    y = fn(*tensors)
    grad = torch.ones_like(y)

    def step():
        with torch.set_grad_enabled(phase != "fwd"):
            out = fn(*tensors)
            if phase != "fwd":
                out.backward(grad)
        torch.cuda.synchronize()
    seconds = _bench(benchmark, step)
    _report(capsys, benchmark, "torch", name, phase, shapes, params, seconds)
