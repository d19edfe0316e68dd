"""Threads are ours on the CPU: which thread pools run in a pycnn training step, and how
pycnn keeps them from fighting its OpenMP kernels (``pycnn.threads()`` reports them).

* **BLAS.**  NumPy's BLAS (OpenBLAS in the wheels) runs the linear layer's small matmuls.
  Left alone it uses every core, and its helper threads then busy-wait for up to ~100 ms
  after each call, holding a core that pycnn's kernels need.  ``blas_single_threaded()``
  limits NumPy's BLAS to one thread for the duration of one of our matmuls and restores the
  previous limit right after (threadpoolctl; nested and concurrent blocks are counted, the
  last one out restores).  Outside our ops NumPy's BLAS keeps whatever limit it had.
* **OpenMP.**  libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, when it is
  loaded, and one libgomp serves the whole process (PyTorch's wheel ships a copy with the
  same soname: whichever loads first serves both).  Its default wait is 300,000 spins
  (about 8 ms of a core on the project's Zen 5 machine, 26 ns a spin): a core stays busy
  through every Python gap of a step, starving the loader thread and everything else on a
  busy machine.  ``passive`` (sleep at once) makes each of the ~70 parallel regions of a
  step pay a futex wake instead (11-80 us against 0.7-2.9 us spinning: 7.7 of 55 ms a step
  on a quiet machine, issue 10's profile).  So where pycnn is the one starting libgomp and
  the user set neither variable, it picks the spin from the machine's load at that moment:
  ``SPIN_COUNT`` = 10,000 spins (about 0.26 ms, longer than most gaps between kernels of a
  step) while the 1-minute load average is at most ``BUSY_LOAD`` x the CPUs this process
  may use, else ``BUSY_SPIN_COUNT`` = 0 (sleep at once, as passive).  ``GOMP_SPINCOUNT`` is
  in ``os.environ`` for the moment of the extension's import only and removed right after,
  so nothing read later (a library loaded afterwards, a child process) sees it.
  Measured with bench/side_by_side.py (each setting its own process, interleaved) on the
  shared 2-core machine at load 4-15, with and without the loader thread: sleeping at once
  ran 1.1-1.5x faster than 10,000 spins, 2,000 spins in between, libgomp's default 0.4-0.6x.
  A quiet window to re-measure the other end never came; that half rests on the profile.
* **The data loader.**  ``pycnn.data.DataLoader(prefetch > 0)`` runs one Python thread per
  iterator (``pycnn-DataLoader-prefetch``); it does NumPy work outside the kernels.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import numpy as np

__all__ = ["blas_single_threaded", "threads"]

LOADER_THREAD_NAME = "pycnn-DataLoader-prefetch"
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")
_OPENMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_DYNAMIC")

# ------------------------------------------------------------------------------------- BLAS

_lock = threading.Lock()
_depth = 0                     # how many blas_single_threaded blocks are open (all threads)
_saved: list = []              # [(library controller, its limit before the outermost block)]
_blas_libs = None              # NumPy's BLAS library controllers, found once


def _numpy_blas_controllers() -> list:
    """threadpoolctl controllers of the BLAS libraries NumPy calls: those inside NumPy's
    folder or its wheel's ``numpy.libs``; all loaded BLAS libraries if none is there (a
    system or conda NumPy).  [] without threadpoolctl."""
    global _blas_libs
    if _blas_libs is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _blas_libs = []
            return _blas_libs
        libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        numpy_dir = os.path.dirname(os.path.realpath(np.__file__))
        roots = (numpy_dir + os.sep, numpy_dir + ".libs" + os.sep)
        own = [lib for lib in libs if os.path.realpath(lib.filepath).startswith(roots)]
        _blas_libs = own or libs
    return _blas_libs


def _set_num_threads(lib, n: int) -> None:
    # threadpoolctl lets one thread at a time (the "controlling thread") change a
    # process-wide OpenBLAS pool and silently ignores the others; our own lock already
    # serialises our changes, so take control for this call and hand it back right after
    clear = getattr(type(lib), "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    lib.set_num_threads(n)
    if clear is not None:
        clear()


def _enter_single_threaded() -> None:
    global _depth
    with _lock:
        if _depth == 0:
            _saved[:] = []
            for lib in _numpy_blas_controllers():
                before = lib.get_num_threads()
                if before is not None and before != 1:
                    _set_num_threads(lib, 1)
                    _saved.append((lib, before))
        _depth += 1


def _exit_single_threaded() -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            for lib, before in _saved:
                _set_num_threads(lib, before)
            _saved[:] = []


@contextlib.contextmanager
def blas_single_threaded(*arrays):
    """Run the block with NumPy's BLAS on one thread (restored after the block).  Given
    arrays that are not all NumPy arrays (CuPy), it changes nothing.

    OpenBLAS's limit is process-wide: while the block runs, a matmul in another thread
    also runs on one thread."""
    if arrays and not all(isinstance(a, np.ndarray) for a in arrays):
        yield
        return
    _enter_single_threaded()
    try:
        yield
    finally:
        _exit_single_threaded()


def _blas_report() -> list[dict]:
    out = []
    for lib in _numpy_blas_controllers():
        info = lib.info()
        with _lock:
            limited = _depth > 0
            outside = next((n for c, n in _saved if c is lib), info.get("num_threads")) if limited \
                else info.get("num_threads")
        out.append({"library": info.get("filepath"), "api": info.get("internal_api"),
                    "version": info.get("version"), "threading_layer": info.get("threading_layer"),
                    "num_threads": info.get("num_threads"), "num_threads_outside_pycnn": outside,
                    "num_threads_in_pycnn_ops": 1, "limited_now": limited})
    return out


# ----------------------------------------------------------------------------------- OpenMP

_extension_load: dict | None = None   # what we saw when pycnn._C was loaded

# libgomp's spin before a waiting thread sleeps, where pycnn starts the runtime (see the
# module's docstring and load_extension): SPIN_COUNT on a machine with CPUs to spare,
# BUSY_SPIN_COUNT when the load average is above BUSY_LOAD x the CPUs (a finished run of our
# own leaves about one load per CPU plus the loader); None leaves libgomp's default
SPIN_COUNT: int | None = 10000
BUSY_SPIN_COUNT: int | None = 0
BUSY_LOAD = 1.5


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def choose_spin_count() -> tuple[int | None, str]:
    """(GOMP_SPINCOUNT pycnn gives libgomp now, why)."""
    cpus = _available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average
        return SPIN_COUNT, "no load average"
    if load > BUSY_LOAD * cpus:
        return BUSY_SPIN_COUNT, f"load average {load:.1f} > {BUSY_LOAD} x {cpus} CPUs"
    return SPIN_COUNT, f"load average {load:.1f} <= {BUSY_LOAD} x {cpus} CPUs"


def _mapped_libraries(prefixes) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name starts with
    one of ``prefixes`` (Linux: /proc/self/maps; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(prefixes))


_extension = None
_extension_checked = False


def cpp_extension():
    """The compiled module ``pycnn._C``, or None (with one warning) where it is not built."""
    global _extension, _extension_checked
    if not _extension_checked:
        _extension_checked = True
        try:
            _extension = load_extension()
        except ImportError as exc:
            warnings.warn(
                f"pycnn: the C++ extension pycnn._C is not available ({exc}); "
                "CPU ops run on the slow NumPy reference. Reinstall with `pip install .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _extension


def load_extension():
    """Import pycnn._C (raises ImportError) and note which OpenMP runtime it got and which
    settings that runtime read at its start.

    Where loading the extension is what starts libgomp (no OpenMP runtime in the process
    yet) and the user set neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``, the
    ``GOMP_SPINCOUNT`` of ``choose_spin_count()`` is in the environment for the moment of
    the import only, then removed: libgomp reads it at its start, and nothing read later (a
    library loaded afterwards, a child process) sees it.  The runtime itself is shared by every library of
    the process that links libgomp (a torch loaded afterwards uses it too)."""
    global _extension_load
    before = _mapped_libraries(_OPENMP_RUNTIMES)
    chosen, why = {}, None
    if not before and not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        spin, why = choose_spin_count()
        if spin is not None:
            chosen = {"GOMP_SPINCOUNT": str(spin)}
    env_at_start = {k: os.environ[k] for k in _OPENMP_ENV if k in os.environ}
    env_at_start.update(chosen)
    os.environ.update(chosen)
    try:
        from pycnn import _C
    finally:
        for key in chosen:
            del os.environ[key]
    after = _mapped_libraries(_OPENMP_RUNTIMES)
    _extension_load = {"runtimes": after, "started_by_pycnn": [p for p in after if p not in before],
                       "env_at_start": env_at_start, "pycnn_chose": chosen, "why": why}
    return _C


def _wait_policy(env: dict, chosen: dict, why: str | None = None) -> str:
    policy = env.get("OMP_WAIT_POLICY", "").strip().lower()
    spin = env.get("GOMP_SPINCOUNT")
    if spin is not None:
        who = f"pycnn's choice: {why}" if "GOMP_SPINCOUNT" in chosen else "GOMP_SPINCOUNT"
        if spin.strip() == "0":
            return f"no spin: sleep at once ({who})"
        return f"spin {spin} times, then sleep ({who})"
    if policy == "passive":
        return "passive: sleep at once (OMP_WAIT_POLICY=passive)"
    if policy == "active":
        return "active: spin for minutes (OMP_WAIT_POLICY=active)"
    return "libgomp's default: spin 300000 times (~8 ms on a Zen 5 core), then sleep"


def _openmp_report(C) -> dict:
    load = _extension_load or {}
    started = load.get("started_by_pycnn", [])
    runtimes = load.get("runtimes") or _mapped_libraries(_OPENMP_RUNTIMES)
    if started:
        policy = _wait_policy(load.get("env_at_start", {}), load.get("pycnn_chose", {}), load.get("why"))
        origin = "started when pycnn._C loaded, with the environment of that moment"
    else:
        policy = "unknown: the runtime was started before pycnn._C by another library"
        origin = "already loaded by another library (one libgomp serves the whole process)"
    return {"num_threads": None if C is None else int(C.num_threads()), "runtimes": runtimes,
            "origin": origin, "wait_policy": policy, "env_at_start": load.get("env_at_start", {}),
            "set_by_pycnn_at_start": load.get("pycnn_chose", {})}


# ----------------------------------------------------------------------------------- report

class ThreadReport(dict):
    """What runs on how many threads in a pycnn training step (a dict; ``print`` it)."""

    def __str__(self):
        omp, lines = self["openmp"], []
        lines.append(f"pycnn._C OpenMP: {omp['num_threads']} threads; {omp['wait_policy']}")
        for path in omp["runtimes"]:
            lines.append(f"  runtime {path}")
        lines.append(f"  {omp['origin']}")
        if not self["blas"]:
            lines.append("NumPy BLAS: not found (threadpoolctl missing?): pycnn cannot limit it")
        for b in self["blas"]:
            lines.append(f"NumPy BLAS {b['api']} {b['version']} ({b['threading_layer']}): "
                         f"{b['num_threads_in_pycnn_ops']} thread in pycnn ops, "
                         f"{b['num_threads_outside_pycnn']} outside{' (limited now)' if b['limited_now'] else ''}")
            lines.append(f"  {b['library']}")
        loader = self["loader"]
        lines.append(f"DataLoader prefetch threads alive: {loader['threads']}")
        return "\n".join(lines)


def threads() -> ThreadReport:
    """Report the thread pools of a pycnn training step on the CPU:

    * ``openmp``: pycnn._C's OpenMP threads (``num_threads``), the runtime libraries mapped,
      whether pycnn started the runtime and the wait policy it read then;
    * ``blas``: NumPy's BLAS libraries, their thread limit now and outside pycnn's ops, and
      the limit inside them (1: the linear layer runs single-threaded BLAS);
    * ``loader``: the DataLoader prefetch threads alive now.

    Loads the extension if it is not loaded yet."""
    C = cpp_extension()
    alive = [t.name for t in threading.enumerate() if t.name == LOADER_THREAD_NAME and t.is_alive()]
    return ThreadReport(openmp=_openmp_report(C), blas=_blas_report(),
                        loader={"threads": len(alive), "name": LOADER_THREAD_NAME})
