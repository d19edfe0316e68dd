"""Benchmark harness: every timed case records one row; a table is printed at session end.

Run:  pytest bench/ --benchmark-only          (about a minute on 2 cores)

Each case first checks its result against the NumPy reference, then times it with
``benchmark.pedantic`` (fixed rounds, warm-up rounds first).  Times are medians.  The table
compares, for each (op, pass, shape):
  pycnn ms    the registered "cpp" implementation as autograd calls it (wrappers, output
              allocation included)
  kernel ms   the bare _C call into preallocated outputs
  numpy ms    the NumPy reference
  torch ms    PyTorch CPU (torch.set_num_threads(2)), through autograd for fwd+bwd
  torch/pycnn speed-up of pycnn over torch (> 1: pycnn is faster)
  GB/s        bytes read + written by the pass (the op spec's cost model, Op.cost) / pycnn time
  copy GB/s   the faster copy of the same bytes: np.copyto (one thread) or torch's copy_
              (2 threads); arrays of this size largely stay in a 32 MiB L3
  of limit    pycnn GB/s / copy GB/s
"""
from __future__ import annotations

import collections
import time

import pytest

_RESULTS = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_RESULTS] = collections.defaultdict(dict)


@pytest.fixture(scope="session", autouse=True)
def _warm_allocator():
    """Allocate and free one 24 MiB array first.  glibc serves big allocations with fresh
    mmap pages (page faults on every output array) until a freed mmap chunk raises its
    threshold; without this the first cases of a session pay for that, later ones don't."""
    import numpy as np
    np.ones(24 * 2**20 // 8).sum()
    yield


ROUND_BUDGET_S = 0.3  # per case: rounds = budget / (time of one call), within ROUND_LIMITS
ROUND_LIMITS = (5, 300)


def pedantic(benchmark, fn, *args):
    """benchmark.pedantic with warm-up rounds and as many rounds as fit in ROUND_BUDGET_S."""
    fn(*args)  # warm-up (and page-in) before the estimate
    start = time.perf_counter()
    fn(*args)
    once = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(max(ROUND_BUDGET_S / once, ROUND_LIMITS[0]), ROUND_LIMITS[1]))
    benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=2)


@pytest.fixture
def record(request, benchmark):
    """``record(key, impl, nbytes)`` after a benchmark: stores the median and GB/s in
    ``benchmark.extra_info`` and in the session table (key = (op, pass, shape); impl one of
    pycnn, kernel, numpy, torch, copy-numpy, copy-torch)."""
    results = request.config.stash[_RESULTS]

    def _record(key, impl, nbytes):
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        median = stats.stats.median
        benchmark.extra_info.update(op=key[0], phase=key[1], shape=str(key[2]), impl=impl, bytes=nbytes,
                                    gb_per_s=round(nbytes / median / 1e9, 3))
        results[key][impl] = (median, nbytes)
    return _record


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(_RESULTS, None)
    if not results:
        return
    # the copy limit of (shape, bytes): the fastest copy measured (np.copyto, torch copy_)
    rows = []
    for key in sorted(results):
        op, phase, shape = key
        r = results[key]
        if "pycnn" not in r:
            continue
        t, nbytes = r["pycnn"]
        gbs = nbytes / t / 1e9
        # the copy limit: the faster copy of the same bytes measured next to this case
        copy = min((r[impl][0] for impl in ("copy-numpy", "copy-torch") if impl in r), default=None)
        limit = nbytes / copy / 1e9 if copy else None

        def ms(impl, r=r):
            return f"{r[impl][0] * 1e3:8.3f}" if impl in r else f"{'-':>8}"
        speedup = f"{r['torch'][0] / t:6.2f}x" if "torch" in r else f"{'-':>7}"
        rows.append(f"{op:<11}{phase:<8}{str(shape):<17}{ms('pycnn')} {ms('kernel')} {ms('numpy')} {ms('torch')} "
                    f"{speedup} {gbs:7.1f} {f'{limit:7.1f}' if limit else '      -'} "
                    f"{f'{gbs / limit:6.2f}' if limit else '     -'}")
    if not rows:
        return
    tr = terminalreporter
    tr.section("pycnn vs torch vs the copy limit (float32, medians)")
    tr.write_line(f"{'op':<11}{'pass':<8}{'shape':<17}{'pycnn ms':>8} {'kernel':>8} {'numpy ms':>8} {'torch ms':>8} "
                  f"{'tch/pyc':>7} {'GB/s':>7} {'copyGB/s':>7} {'of lim':>6}")
    for row in rows:
        tr.write_line(row)
    tr.write_line("GB/s = bytes read + written / pycnn time; copyGB/s = the faster of np.copyto (1 thread) and "
                  "torch copy_ (2 threads) moving the same bytes; 'of lim' = GB/s / copyGB/s.")
