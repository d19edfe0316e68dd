"""Benchmarks of the compute-bound ops (conv3x3 and conv3x3_act: every op whose spec has CPU
``bench`` cases of more than 4 FLOPs a byte): pycnn "cpp" (each algorithm and ``auto``, the
router's choice), the unfused chain of a fused op (conv3x3 then relu) and PyTorch CPU
(oneDNN), 2 threads each, against the FMA peak.  (Pooling, memory-bound, is timed with the
other memory-bound ops in bench/test_activations.py.)

    pytest bench/test_conv_pool.py --benchmark-only          (about 2 minutes on 2 cores)

Cases, shapes, FLOP counts (direct-convolution FLOPs; fwd+bwd adds grad_x and grad_weight,
one forward each) and the torch forms come from the op specs (pycnn/ops/conv.py) through
pycnn/bench/measure.py, as for ``pycnn bench``.  Every pycnn case first checks its result
against the float64 reference on the first 2 images of the batch, then times the full batch
through the registry implementation as autograd calls it.  Times are medians; the limit is
the FMA peak of the 2 OpenMP threads, measured by _C.fma_peak_gflops.  Winograd does fewer
FLOPs than it is credited with.
"""
from __future__ import annotations

import math

import pytest

from bench.conftest import pedantic  # noqa: E402
from pycnn.bench import harness, measure
from pycnn.ops import registry


def _compute_bound(op, case):
    flops, nbytes = op.cost("fwd", case.shapes, case.params)
    return flops > measure.COMPUTE_BOUND * nbytes


def _impls(op):
    algos = [a for a in op.algorithms("cpp") if a != "reference"]
    return (algos + ["auto"] if len(algos) > 1 else ["auto"]) + (["unfused"] if op.unfused else []) + ["torch"]


CASES = [(op.name, i, phase, impl) for op in registry.all_ops() for i, case in enumerate(op.bench)
         if case.where == "cpu" and _compute_bound(op, case) for phase in case.phases for impl in _impls(op)]


@pytest.fixture(scope="module")
def C():
    C = pytest.importorskip("pycnn._C")
    before = C.num_threads()
    C.set_num_threads(2)
    yield C
    C.set_num_threads(before)


class _Table:
    """Collects the medians; prints one table (and geometric-mean speedups) at the end."""

    def __init__(self, peak):
        self.times, self.peak = {}, peak  # (op, index, phase, impl) -> seconds

    def pytest_terminal_summary(self, terminalreporter):
        if not self.times:
            return
        tr = terminalreporter
        tr.section("compute-bound ops: pycnn vs torch (oneDNN), 2 threads, float32, medians")
        tr.write_line(f"FMA peak of 2 threads (measured): {self.peak:.0f} GFLOP/s")
        tr.write_line(f"{'op':<13}{'shape':<20}{'pass':<9}{'impl':<10}{'pycnn ms':>9}{'torch ms':>9}{'speedup':>8}"
                      f"{'GFLOP/s':>9}{'of peak':>8}")
        speedups = {}
        for (name, index, phase, impl), t in sorted(self.times.items()):
            if impl == "torch":
                continue
            op = registry.get(name)
            flops = op.cost(phase, op.bench[index].shapes, op.bench[index].params)[0]
            torch_t = self.times.get((name, index, phase, "torch"))
            speedup = torch_t / t if torch_t else math.nan
            speedups.setdefault((name, phase, impl), []).append(speedup)
            tr.write_line(f"{name:<13}{harness.shape_text(op.bench[index].shapes):<20}{phase:<9}{impl:<10}"
                          f"{t * 1e3:9.3f}{(torch_t or math.nan) * 1e3:9.3f}{speedup:7.2f}x{flops / t / 1e9:9.1f}"
                          f"{flops / t / 1e9 / self.peak:8.2f}")
        for (name, phase, impl), values in sorted(speedups.items()):
            gm = math.exp(sum(math.log(v) for v in values) / len(values))
            tr.write_line(f"geometric mean speedup over torch, {name} {phase:<8} {impl:<9}: {gm:5.2f}x")


@pytest.fixture(scope="module")
def table(request, C):
    config = request.config
    found = getattr(config, "_pycnn_compute_table", None)
    if found is None:
        found = config._pycnn_compute_table = _Table(max(C.fma_peak_gflops(20_000_000) for _ in range(3)))
        config.pluginmanager.register(found, "pycnn-compute-table")
    return found


@pytest.mark.parametrize("name, index, phase, impl", CASES,
                         ids=[f"{n}-{p}-{harness.shape_text(registry.get(n).bench[i].shapes).replace(' ', '')}-{m}"
                              for n, i, p, m in CASES])
def test_compute_bound_op(benchmark, table, C, name, index, phase, impl):
    op = registry.get(name)
    case = op.bench[index]
    inputs, params, grad = measure.case_data(name, index)
    benchmark.group = f"{name} {phase} {case.shapes}"
    if impl == "torch":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(2)
        run, _ = measure.torch_runner(torch, op, phase, inputs, params, grad)
        y = measure.run_impl(measure.cpp_route(op, inputs, params), "fwd", inputs, params, grad)[0]
        measure.check_torch(op, lambda: (run()[0], ()), y, ())
    elif impl == "unfused":
        run = measure.chain_runner(op, phase, inputs, params, grad)
    else:
        impl_ = measure.cpp_route(op, inputs, params, impl)
        if impl_ is None:
            pytest.skip(f"the cpp backend has no {name}")
        measure.check(op, impl_, phase, inputs, params, grad)

        def run():
            return measure.run_impl(impl_, phase, inputs, params, grad)
    pedantic(benchmark, run)
    median = benchmark.stats.stats.median if getattr(benchmark, "stats", None) else None
    if median is not None:
        table.times[name, index, phase, impl] = median
        flops = measure.cost(op, case, phase, inputs)[0]
        benchmark.extra_info.update(op=name, phase=phase, shape=str(case.shapes), impl=impl, flops=flops,
                                    gflop_per_s=round(flops / median / 1e9, 1),
                                    fraction_of_peak=round(flops / median / 1e9 / table.peak, 3))
