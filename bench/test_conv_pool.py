"""conv3x3 and 2x2 pooling benchmarks: pycnn "cpp" (each conv algorithm, and 'auto') vs
PyTorch CPU (oneDNN), 2 threads each, against the machine's limits.

    pytest bench/test_conv_pool.py --benchmark-only          (about 2 minutes on 2 cores)

Every pycnn case first checks its result against the NumPy reference (on the first 2 images
of the batch: the reference takes seconds on the whole batch), then times the full batch
through the registry implementation as autograd calls it (wrappers and output allocation
included).  Times are medians.

The shapes, data, checks, FLOP and byte counts are those of ``pycnn bench``
(pycnn/bench/harness.py, where the arithmetic is written out):
  conv3x3, batch 32, float32: direct-convolution FLOPs (fwd+bwd: 3x the forward); limit: the
  FMA peak of the 2 OpenMP threads, measured by _C.fma_peak_gflops (24 independent AVX-512
  FMA chains per thread).  Winograd does fewer FLOPs than it is credited with.
  conv3x3_act (conv3x3 + bias + relu fused) next to the unfused pair and torch.
  Pooling: bytes read + written (maxpool 5.25E fwd, 10.5E fwd+bwd with its 1-byte winners;
  avgpool 5E, 10E; E = elements of x); limit: a copy of the same bytes (np.copyto, 1
  thread, or torch copy_, 2 threads; the faster), in the table of bench/conftest.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pycnn.bench import harness as benchmarks
from pycnn.autograd import Context
from pycnn.bench.harness import conv_data as _conv_data
from pycnn.bench.harness import run_impl
from pycnn.ops import registry
from bench.conftest import pedantic  # noqa: E402

N = benchmarks.N
CONV_SHAPES = benchmarks.CONV_SHAPES  # (C, K, H=W)
CONV_IMPLS = ["auto", "direct", "winograd", "torch"]
PHASES = list(benchmarks.PHASES)
POOL_SHAPES = benchmarks.MAP_SHAPES
POOL_OPS = list(benchmarks.POOL_OPS)






@pytest.fixture(scope="module")
def C():
    C = pytest.importorskip("pycnn._C")
    before = C.num_threads()
    C.set_num_threads(2)
    yield C
    C.set_num_threads(before)


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


# ------------------------------------------------------------------- the conv table
class _ConvTable:
    """Collects conv3x3 medians; prints one table (and the geometric means) at the end."""

    def __init__(self):
        self.times = {}  # (shape, phase, impl) -> seconds
        self.peak = None

    def pytest_terminal_summary(self, terminalreporter):
        if not self.times:
            return
        tr = terminalreporter
        tr.section("conv3x3: pycnn vs torch (oneDNN), 2 threads, float32, batch 32, medians")
        peak = self.peak or float("nan")
        tr.write_line(f"FMA peak of 2 threads (measured): {peak:.0f} GFLOP/s")
        tr.write_line(f"{'(C, K, H=W)':<15}{'pass':<9}{'algo':<10}{'pycnn ms':>9}{'torch ms':>9}{'speedup':>8}"
                      f"{'GFLOP/s':>9}{'of peak':>8}{'torch GF/s':>11}")
        speedups = {}
        for shape in CONV_SHAPES:
            for phase in PHASES:
                torch_t = self.times.get((shape, phase, "torch"))
                flops = _conv_flops(shape, phase)
                for impl in CONV_IMPLS[:-1]:
                    t = self.times.get((shape, phase, impl))
                    if t is None:
                        continue
                    speedup = torch_t / t if torch_t else float("nan")
                    speedups.setdefault((phase, impl), []).append(speedup)
                    tr.write_line(f"{str(shape):<15}{phase:<9}{impl:<10}{t * 1e3:9.3f}"
                                  f"{(torch_t or math.nan) * 1e3:9.3f}{speedup:7.2f}x{flops / t / 1e9:9.1f}"
                                  f"{flops / t / 1e9 / peak:8.2f}{flops / (torch_t or math.nan) / 1e9:11.1f}")
        for (phase, impl), values in sorted(speedups.items()):
            gm = math.exp(sum(math.log(v) for v in values) / len(values))
            tr.write_line(f"geometric mean speedup over torch, {phase:<8} {impl:<9}: {gm:5.2f}x "
                          f"(C=3 layer: {values[0]:.2f}x)")
        tr.write_line("speedup = torch ms / pycnn ms; GFLOP/s counts direct-convolution FLOPs "
                      "(fwd+bwd: 3x forward); 'of peak' = GFLOP/s / measured FMA peak.")


@pytest.fixture(scope="module")
def conv_table(request, C):
    config = request.config
    table = getattr(config, "_pycnn_conv_table", None)
    if table is None:
        table = _ConvTable()
        table.peak = max(C.fma_peak_gflops(20_000_000) for _ in range(3))
        config._pycnn_conv_table = table
        config.pluginmanager.register(table, "pycnn-conv-table")
    return table


def _conv_flops(shape, phase):
    return benchmarks.conv_flops(shape, phase)


def _run_conv(impl, phase, x, w, b, g):
    return run_impl(impl, phase, (x, w, b), {}, g)


def _conv_impl(algo, shape, op="conv3x3"):
    c, k, h = shape
    impl = benchmarks.cpp_impl(op, algo, [(N, c, h, h), (k, c, 3, 3), (k,)])
    if impl is None:
        pytest.skip(f"the cpp backend has no {op}")
    return impl


def _check_conv(impl, phase, x, w, b, g):
    benchmarks.check_conv(impl, phase, x, w, b, g)


CONV_CASES = [(shape, phase, impl) for shape in CONV_SHAPES for phase in PHASES for impl in CONV_IMPLS]


@pytest.mark.parametrize("shape, phase, impl", CONV_CASES,
                         ids=[f"conv3x3-{phase}-C{s[0]}K{s[1]}H{s[2]}-{impl}" for s, phase, impl in CONV_CASES])
def test_conv3x3(benchmark, conv_table, C, shape, phase, impl):
    x, w, b, g = _conv_data(shape)
    benchmark.group = f"conv3x3 {phase} {shape}"
    if impl == "torch":
        torch = _torch()
        import torch.nn.functional as F
        xt, wt, bt, gt = (torch.from_numpy(a) for a in (x, w, b, g))

        def run():
            if phase == "fwd":
                with torch.no_grad():
                    return F.conv2d(xt, wt, bt, padding=1)
            leaves = [a.detach().requires_grad_() for a in (xt, wt, bt)]
            y = F.conv2d(*leaves, padding=1)
            y.backward(gt)
            return y
        y_ours, _ = _run_conv(_conv_impl("direct", shape), "fwd", x, w, b, g)
        np.testing.assert_allclose(run().detach().numpy(), y_ours, rtol=1e-4, atol=1e-4)
    else:
        kernel = _conv_impl(impl, shape)
        _check_conv(kernel, phase, x, w, b, g)

        def run():
            return _run_conv(kernel, phase, x, w, b, g)
    pedantic(benchmark, run)
    median = benchmark.stats.stats.median if getattr(benchmark, "stats", None) else None
    if median is not None:
        conv_table.times[shape, phase, impl] = median
        flops = _conv_flops(shape, phase)
        benchmark.extra_info.update(op="conv3x3", phase=phase, shape=str(shape), impl=impl, flops=flops,
                                    gflop_per_s=round(flops / median / 1e9, 1),
                                    fraction_of_peak=round(flops / median / 1e9 / conv_table.peak, 3))


# ------------------------------------------------------------------------------ pooling
def _pool_bytes(op, phase, shape):
    return benchmarks.pass_bytes(op, phase, shape)


def _pool_data(shape):
    (x,), g = benchmarks.map_data("maxpool2x2", shape)  # the same arrays for both pooling ops
    return x, g


def _run_pool(impl, phase, x, g):
    ctx = Context((True,))
    y = impl.forward(ctx, x)
    return y, (impl.backward(ctx, g) if phase == "fwd+bwd" else ())


POOL_CASES = [(op, phase, shape, impl) for op in POOL_OPS for phase in PHASES for shape in POOL_SHAPES
              for impl in ("pycnn", "kernel", "torch")]


def _pool_kernel(C, op, phase, x, g):
    """The bare _C calls into preallocated outputs (no wrapper, no allocation)."""
    y = np.full(g.shape, np.nan, np.float32)
    gx = np.full_like(x, np.nan)
    arg = np.empty(g.shape, np.uint8)
    if op == "maxpool2x2":
        def run():
            C.maxpool2x2_forward(x, y, arg)
            if phase == "fwd+bwd":
                C.maxpool2x2_backward(g, arg, gx)
            return y, ((gx,) if phase == "fwd+bwd" else ())
    else:
        def run():
            C.avgpool2x2_forward(x, y)
            if phase == "fwd+bwd":
                C.avgpool2x2_backward(g, gx)
            return y, ((gx,) if phase == "fwd+bwd" else ())
    return run


@pytest.mark.parametrize("op, phase, shape, impl", POOL_CASES,
                         ids=[f"{op}-{phase}-{'x'.join(map(str, s))}-{i}" for op, phase, s, i in POOL_CASES])
def test_pool(benchmark, record, C, op, phase, shape, impl):
    x, g = _pool_data(shape)
    y_ref, grads_ref = _run_pool(registry.get(op).reference, phase, x, g)
    if impl == "torch":
        torch = _torch()
        import torch.nn.functional as F
        fn = F.max_pool2d if op == "maxpool2x2" else F.avg_pool2d
        xt, gt = torch.from_numpy(x), torch.from_numpy(g)

        def run():
            if phase == "fwd":
                with torch.no_grad():
                    return fn(xt, 2), ()
            leaf = xt.detach().requires_grad_()
            y = fn(leaf, 2)
            y.backward(gt)
            return y.detach(), (leaf.grad,)
        y, grads = run()
        y, grads = y.numpy(), tuple(t.numpy() for t in grads)
    elif impl == "kernel":
        run = _pool_kernel(C, op, phase, x, g)
        y, grads = run()
    else:
        if "default" not in registry.get(op).algorithms("cpp"):
            pytest.skip("the cpp backend is not available")
        kernel = registry.get(op).impls[("cpp", "default")]

        def run():
            return _run_pool(kernel, phase, x, g)
        y, grads = run()
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    benchmark.group = f"{op} {phase} {shape}"
    pedantic(benchmark, run)
    record((op, phase, shape), impl, _pool_bytes(op, phase, shape))


COPY_CASES = [(op, phase, shape, impl) for op in POOL_OPS for phase in PHASES for shape in POOL_SHAPES
              for impl in ("numpy", "torch")]


@pytest.mark.parametrize("op, phase, shape, impl", COPY_CASES,
                         ids=[f"copy-{op}-{p}-{'x'.join(map(str, s))}-{i}" for op, p, s, i in COPY_CASES])
def test_pool_copy_limit(benchmark, record, op, phase, shape, impl):
    """A copy of nbytes/2 bytes: the same traffic as the pooling pass (see the module docstring)."""
    nbytes = _pool_bytes(op, phase, shape)
    src = np.random.default_rng(0).standard_normal(nbytes // 8, dtype=np.float32)
    dst = np.empty_like(src)
    if impl == "numpy":
        copy, args = np.copyto, (dst, src)
    else:
        torch = _torch()
        copy, args = torch.Tensor.copy_, (torch.from_numpy(dst), torch.from_numpy(src))
    copy(*args)
    np.testing.assert_array_equal(dst, src)
    benchmark.group = f"copy {nbytes} bytes"
    pedantic(benchmark, copy, *args)
    record((op, phase, shape), f"copy-{impl}", nbytes)  # the row of the pooling pass in the table


# ------------------------------------------------------------ conv3x3 + relu, fused or not
FUSED_CASES = [(shape, phase, impl) for shape in benchmarks.FUSED_SHAPES for phase in PHASES
               for impl in ("fused", "unfused", "torch")]


@pytest.mark.parametrize("shape, phase, impl", FUSED_CASES,
                         ids=[f"conv3x3_act-{p}-C{s[0]}K{s[1]}H{s[2]}-{i}" for s, p, i in FUSED_CASES])
def test_conv3x3_relu(benchmark, C, shape, phase, impl):
    """relu(conv3x3(x) + b): one conv3x3_act call, conv3x3 then relu, or torch (conv2d, relu)."""
    x, w, b, g = _conv_data(shape)
    benchmark.group = f"conv3x3+relu {phase} {shape}"
    if impl == "torch":
        run = benchmarks.torch_conv_runner(_torch(), phase, x, w, b, g, activation="relu")
        y_ours, _ = run_impl(_conv_impl("auto", shape, "conv3x3_act"), "fwd", (x, w, b, None),
                             {"activation": "relu"}, g)
        np.testing.assert_allclose(run().numpy(), y_ours, rtol=1e-4, atol=1e-4)
    elif impl == "fused":
        fused = _conv_impl("auto", shape, "conv3x3_act")
        benchmarks.check_conv(fused, phase, x, w, b, g, op="conv3x3_act", params={"activation": "relu"})

        def run():
            return run_impl(fused, phase, (x, w, b, None), {"activation": "relu"}, g)
    else:
        conv, relu = _conv_impl("auto", shape), benchmarks.cpp_impl("relu")

        def run():
            return benchmarks.run_unfused(conv, relu, phase, x, w, b, g)
    pedantic(benchmark, run)
