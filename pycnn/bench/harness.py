"""The cases of ``pycnn bench``, generated from the op specs, and the table they make.

A case is (op, algorithm, one of the op's CPU ``bench`` shapes, pass), for every op the C++
backend implements: each algorithm and ``auto`` (the router's choice) where the backend has
several; for an op that fuses others (``unfused``: conv3x3_act), also the unfused chain
(shown as ``conv3x3+relu``).  Each case first checks pycnn's result against the float64
reference (pycnn/bench/measure.py), then times the C++ implementation as autograd calls it
(wrappers and output allocation included) and PyTorch CPU (the spec's ``torch`` form) on
the same arrays, both on 2 threads; times are medians of repeated runs after warm-up.
Without torch the torch columns are empty.

Work and limits, from the specs' cost model (``Op.cost``, forward and backward):
  compute-bound ops (more than 4 FLOPs a byte: conv3x3, conv3x3_act): GFLOP/s against the
    FMA peak of the 2 threads measured by ``_C.fma_peak_gflops`` (Winograd does fewer FLOPs
    than it is credited with, so it may pass 1.0);
  memory-bound ops: GB/s of the bytes read + written against a copy of as many bytes (reads
    B/2, writes B/2) by torch's copy_ on 2 threads (np.copyto, one thread, without torch).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics

import numpy as np

from pycnn.bench import measure
from pycnn.bench.measure import THREADS
from pycnn.device import cpp_extension
from pycnn.ops import registry

PHASES = registry.PHASES
JSON_KEYS = ("op", "algo", "shape", "pass", "pycnn_ms", "torch_ms", "speedup", "gbps", "gflops", "limit_fraction",
             "pycnn_spread")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str       # the op as the table shows it (conv3x3+relu: the unfused chain)
    algo: str
    index: int    # into the spec's ``bench``
    phase: str
    group: str    # the op of the spec (what --ops selects it by)
    unfused: bool = False

    @property
    def shape(self) -> tuple:
        return registry.get(self.group).bench[self.index].shapes

    @property
    def shape_text(self) -> str:
        return shape_text(self.shape)


def shape_text(shapes) -> str:
    """x's shape, and K (the output channels) where the second input is a conv weight."""
    text = "x".join(map(str, shapes[0]))
    if len(shapes) > 1 and shapes[1] is not None and len(shapes[1]) == 4:
        text += f" K{shapes[1][0]}"
    return text


def _algorithms(op) -> list[str]:
    algos = [a for a in op.algorithms("cpp") if a != "reference"]
    return algos + ["auto"] if len(algos) > 1 else ["default"] if algos else []


def cases(quick: bool = False, ops=None) -> list[Case]:
    """Every case (``quick``: the first shape of each op), optionally only the ops named."""
    out = []
    for op in registry.all_ops():
        indices = [i for i, case in enumerate(op.bench) if case.where == "cpu"]
        for i in indices[:1] if quick else indices:
            phases = op.bench[i].phases
            for phase in phases:
                out += [Case(op.name, algo, i, phase, op.name) for algo in _algorithms(op)]
                if op.unfused is not None and _algorithms(op):
                    chain = "+".join(step[0] for step in op.unfused((None,) * 4, op.bench[i].params))
                    out.append(Case(chain, "auto", i, phase, op.name, unfused=True))
    if ops:
        unknown = set(ops) - {c.group for c in out}
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; choose from {sorted({c.group for c in out})}")
        out = [c for c in out if c.group in ops]
    return out


@dataclasses.dataclass
class Row:
    op: str
    algo: str
    shape: str
    phase: str
    pycnn_ms: float | None
    torch_ms: float | None
    speedup: float | None
    gbps: float | None
    gflops: float | None
    limit_fraction: float | None
    pycnn_spread: float | None = None  # interquartile range / median of pycnn's timed runs

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("phase")
        return {key: d[key] for key in JSON_KEYS}


class Bench:
    """Runs cases: checks, times, and turns the medians into rows."""

    def __init__(self, quick: bool = False, torch=None, log=None):
        self.timer = measure.QUICK if quick else measure.FULL
        self.torch = torch
        self.log = log or (lambda message: None)
        self._torch_times: dict = {}
        self._copy_times: dict = {}
        self._peak = None
        self.quick = quick
        self.checked = 0        # cases whose result matched the float64 reference before timing
        self.torch_checked = 0  # (shape, pass) pairs whose torch result matched pycnn's

    @property
    def peak_gflops(self) -> float:
        if self._peak is None:
            iters = 2_000_000 if self.quick else 20_000_000
            self._peak = max(_C().fma_peak_gflops(iters) for _ in range(3))
        return self._peak

    def copy_gbps(self, nbytes: int) -> float:
        if nbytes not in self._copy_times:
            self._copy_times[nbytes] = self.timer.median(measure.copy_runner(nbytes, self.torch))
        return nbytes / self._copy_times[nbytes] / 1e9

    def run(self, case: Case) -> Row:
        self.log(f"{case.op} {case.algo} {case.shape_text} {case.phase}")
        op = registry.get(case.group)
        spec = op.bench[case.index]
        inputs, params, grad = measure.case_data(op.name, case.index)
        if case.unfused:
            fn = measure.chain_runner(op, case.phase, inputs, params, grad)
        else:
            impl = measure.cpp_route(op, inputs, params, "auto" if case.algo == "default" else case.algo)
            measure.check(op, impl, case.phase, inputs, params, grad)
            self.checked += 1
            fn = functools.partial(measure.run_impl, impl, case.phase, inputs, params, grad)
        times = self.timer.times(fn)
        t, spread = statistics.median(times), measure.spread(times)
        t_torch = self._torch_time(op, case, inputs, params, grad)
        flops, nbytes = measure.cost(op, spec, case.phase, inputs)
        if measure.compute_bound(op, spec, inputs):
            gflops = flops / t / 1e9
            return Row(case.op, case.algo, case.shape_text, case.phase, t * 1e3, _ms(t_torch), _ratio(t_torch, t),
                       None, gflops, gflops / self.peak_gflops, spread)
        gbps = nbytes / t / 1e9
        return Row(case.op, case.algo, case.shape_text, case.phase, t * 1e3, _ms(t_torch), _ratio(t_torch, t), gbps,
                   None, gbps / self.copy_gbps(nbytes), spread)

    def _torch_time(self, op, case, inputs, params, grad):
        """The torch median of a (shape, pass), measured once, checked against pycnn's result
        (not where torch draws its own random numbers), shared by the algorithms."""
        if self.torch is None:
            return None
        key = (op.name, case.index, case.phase)
        if key not in self._torch_times:
            run, comparable = measure.torch_runner(self.torch, op, case.phase, inputs, params, grad)
            if comparable:
                impl = measure.cpp_route(op, inputs, params)
                y, grads = measure.run_impl(impl, case.phase, inputs, params, grad)
                measure.check_torch(op, run, np.asarray(y), tuple(np.asarray(g) for g in grads if g is not None))
                self.torch_checked += 1
            self._torch_times[key] = self.timer.median(run)
        return self._torch_times[key]


def _C():
    C = cpp_extension()
    if C is None:
        raise RuntimeError("pycnn bench needs the C++ extension pycnn._C, which is not built")
    return C


def _load() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _ratio(t_torch, t):
    return None if t_torch is None else t_torch / t


def run(quick: bool = False, ops=None, use_torch: bool = True, log=None) -> tuple[list[Row], dict]:
    """Check and time every case; returns (rows, facts about the run)."""
    C = _C()
    threads_before = C.num_threads()
    C.set_num_threads(THREADS)
    torch = measure.torch_module() if use_torch else None
    try:
        bench = Bench(quick=quick, torch=torch, log=log)
        np.ones(24 * 2 ** 20 // 8).sum()  # raise glibc's mmap threshold before the first case (bench/conftest.py)
        load_before = _load()
        rows = [bench.run(case) for case in cases(quick, ops)]
        facts = {"threads": THREADS, "torch": None if torch is None else torch.__version__,
                 "torch_left_out": not use_torch, "fma_peak_gflops": bench._peak, "quick": quick,
                 "load_before": load_before, "load_after": _load(), "cpus": os.cpu_count(),
                 "checked": bench.checked, "torch_checked": bench.torch_checked}
        return rows, facts
    finally:
        C.set_num_threads(threads_before)


def table(rows: list[Row], facts: dict) -> str:
    """The rows as one aligned text table, with what the columns mean."""
    w = max([14] + [len(r.op) + 1 for r in rows])  # the op column
    header = (f"{'op':<{w}}{'algo':<10}{'shape':<20}{'pass':<9}{'pycnn ms':>9}{'spread':>7}{'torch ms':>9}"
              f"{'speedup':>8}{'GB/s':>7}{'GFLOP/s':>9}{'of limit':>9}")
    torch_text = facts.get("torch") or ("left out: --no-torch" if facts.get("torch_left_out") else
                                        "torch not installed")
    lines = [f"pycnn vs PyTorch CPU ({torch_text}), {facts['threads']} threads, "
             "float32, medians", header, "-" * len(header)]

    def num(value, width, fmt):
        return f"{'-':>{width}}" if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"{value:>{width}{fmt}}"
    for r in rows:
        spread = None if r.pycnn_spread is None else 100 * r.pycnn_spread
        lines.append(f"{r.op:<{w}}{r.algo:<10}{r.shape:<20}{r.phase:<9}{num(r.pycnn_ms, 9, '.3f')}"
                     f"{num(spread, 6, '.0f')}{'%' if spread is not None else ' '}{num(r.torch_ms, 9, '.3f')}"
                     f"{num(r.speedup, 7, '.2f')}{'x' if r.speedup else ' '}"
                     f"{num(r.gbps, 7, '.1f')}{num(r.gflops, 9, '.1f')}{num(r.limit_fraction, 9, '.2f')}")
    if facts.get("fma_peak_gflops"):
        lines.append(f"limit: conv = the FMA peak of {facts['threads']} threads, {facts['fma_peak_gflops']:.0f} "
                     "GFLOP/s (measured); others = a copy of the same bytes (torch copy_, "
                     f"{facts['threads']} threads)")
    else:
        lines.append("limit: a copy of the same bytes (torch copy_ on 2 threads, np.copyto without torch)")
    lines.append("speedup = torch ms / pycnn ms; FLOPs and bytes: the specs' model (conv: direct-convolution "
                 "FLOPs, fwd+bwd 3x the forward); conv3x3+relu = conv3x3 then relu, unfused")
    above = [r for r in rows if r.limit_fraction is not None and r.limit_fraction > 1]
    for compute, why in ((True, "the case is credited with the direct convolution's FLOPs and Winograd does fewer "
                                "multiplications than that, so its effective rate can pass the FMA peak"),
                         (False, "the op moved its bytes faster than the copy it is compared with (its data stayed in "
                                 "cache, or the copy was slowed by other processes)")):
        these = [r for r in above if (r.gflops is not None) == compute]
        if these:
            top = max(these, key=lambda r: r.limit_fraction)
            lines.append(f"of limit above 1 ({len(these)} row{'s' if len(these) > 1 else ''}, up to "
                         f"{top.limit_fraction:.2f} for {top.op} {top.algo} {top.phase}): {why}")
    lines.extend(_conditions(rows, facts))
    return "\n".join(lines)


def _conditions(rows: list[Row], facts: dict) -> list[str]:
    """The lines that say how far to trust the table: the correctness checks, the run-to-run
    spread, the machine's load."""
    lines = []
    if "checked" in facts:
        torch_part = (f" and pycnn matched PyTorch on {facts['torch_checked']} (shape, pass) pairs"
                      if facts.get("torch_checked") else "")
        lines.append(f"correctness: all {facts['checked']} checked cases matched the float64 NumPy reference before "
                     f"they were timed{torch_part} (a mismatch stops pycnn bench)")
    spreads = [(r.pycnn_spread, r) for r in rows if r.pycnn_spread is not None]
    if spreads:
        worst, row = max(spreads, key=lambda sr: sr[0])
        middle = statistics.median(s for s, _ in spreads)
        lines.append(f"run-to-run spread of pycnn's timed runs (interquartile range / median): median "
                     f"{100 * middle:.0f}%, worst {100 * worst:.0f}% ({row.op} {row.algo} {row.shape} {row.phase})")
    if facts.get("load_before") is not None:
        cpus = facts.get("cpus") or 0
        busy = max(facts["load_before"], facts.get("load_after") or 0) > max(cpus - facts["threads"], 1)
        lines.append(f"load average {facts['load_before']:.2f} before, {facts.get('load_after') or 0:.2f} after, on "
                     f"{cpus} CPUs" + ("; the machine was busy: other processes shared the cores, so times and ratios "
                                       "may swing several-fold between runs (run again on an idle machine)" if busy
                                       else ""))
    return lines
