"""A whole training step captured as one CUDA graph and replayed, without Python in the loop.

    step = GraphedStep(train_step, optimizer=opt, model=net)   # train_step(x, y) -> loss
    for x, y in batches:
        loss = step(x, y)          # the same Tensor object every call; read it before the next

A step of the README net is about 80 kernel launches; through Python each costs 10-90 us of
host time, more than the kernel itself at small batches.  A CUDA graph (CuPy's stream
capture) records the launches of one step once and replays them at a few microseconds
each.  What the graph cannot know is what changes from step to step on the host side:

* **the inputs**: each call copies x and y into the static buffers the graph reads;
* **per-step scalars** that kernels took by value: the dropout / rrelu stream keys (drawn
  from ``pycnn.random``), the optimizer's lr (schedules, warm-up) and Adam's step count.
  During capture these become rows of a small *live table* on the device: ``next_seed()``
  hands out placeholder seeds, the optimizer registers a getter per parameter, and the
  kernels read ``table[index]`` instead of their by-value argument.  Before each replay
  ``LiveTable.refresh`` calls every getter in the order they were registered (the order in
  which an eager step computes the same values: the same seeds are drawn, the same steps
  counted) and copies the table to the device: a replay computes what an eager step would.

Capture needs one eager step first (``warmup``): the kernels compile, cuBLAS starts and the
optimizer's state exists (its first step is special).  A new input shape captures a graph of
its own (the last, smaller batch of an epoch); a parameter array replaced (checkpoint
loading), a changed optimizer setting other than lr, or the model put in evaluation mode
makes the graph stale: it is captured again.  Whatever cannot be captured (an L1 term, a
host read inside the step, ...) makes the step run eagerly from then on, with one warning
saying why.  Everything the graph allocated comes from a memory pool of its own, so the
addresses it replays stay valid.

Without a GPU (``NUMBA_ENABLE_CUDASIM=1``, the cuda backend on NumPy arrays) the graph is
emulated: a replay runs the step's Python again in the same live mode and checks that every
launch has the kernel, grid and by-value arguments of the captured one -- the property a
real graph relies on (tests/test_cuda_graph.py).

The ops below this module never import it: it hooks the live table of the capture in
progress into ``pycnn.ops._util`` (``live_table``), where the cuda backend and the host-side
random draws read it.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings

import numpy as np

from pycnn import random as _random
from pycnn.autograd import Tensor
from pycnn.device import is_cuda_array
from pycnn.kernels.splitmix import seed_key
from pycnn.ops import _util, cuda_backend, routing

CAPACITY = 4096  # values per dtype in a live table
LIVE_DTYPES = (np.uint64, np.float32, np.float64)  # stream keys; lr and Adam's corrections per parameter dtype



class GraphCaptureError(RuntimeError):
    """The step cannot be captured as a CUDA graph (it then runs eagerly)."""


# ----------------------------------------------------------------------------- live table

# the live table of the capture in progress in this thread (or of an emulated replay)
_active: contextvars.ContextVar = contextvars.ContextVar("pycnn_graph_capture", default=None)


def active() -> LiveTable | None:
    """The live table of the capture in progress in this thread, else None."""
    return _active.get()


_util.set_live_table(active)  # the ops read it there


def require_eager(what: str) -> None:
    """Raise GraphCaptureError when a capture is in progress: ``what`` cannot be captured."""
    if _active.get() is not None:
        raise GraphCaptureError(f"{what} cannot be captured in a CUDA graph")


class LiveTable:
    """Values that kernels of a captured step read from device memory, one row per getter.

    ``values(dtype, getters, width)`` registers rows (each getter returns ``width`` values)
    and returns (device table, base index); ``placeholder_seed()`` registers a uint64 stream
    key drawn by ``pycnn.random.next_seed`` at refresh time.  ``immediate``: getters run at
    registration (the emulation executes while it records); else at ``refresh``."""

    PLACEHOLDER_BASE = 2 ** 64 - 2 ** 32  # placeholder seeds: above every seed next_seed draws (< 2**63)

    def __init__(self, xp, immediate: bool):
        self._xp = xp            # numpy (the emulation) or cupy
        self._immediate = immediate
        self._host: dict = {}    # dtype -> (CAPACITY,) host array
        self._device: dict = {}  # dtype -> (CAPACITY,) array on like's device
        self._used: dict = {}    # dtype -> values in use
        self._rows: list = []    # (dtype, base, width, getter), in registration order
        self._seeds: dict = {}   # placeholder seed -> index in the uint64 table
        self._recording = True
        self._cursor = 0         # the row a replay pass is at (emulation)
        self._hooks: list = []   # host-side bookkeeping each replay redoes

    # ---------------------------------------------------------------- registration
    def values(self, dtype, getters, width: int):
        dtype = np.dtype(dtype)
        if not self._recording:  # an emulated replay: the rows of the capture, in order
            return self._replayed_rows(dtype, len(getters), width)
        used = self._used.get(dtype, 0)
        if used + width * len(getters) > CAPACITY:
            raise GraphCaptureError(f"the step needs more than {CAPACITY} per-step {dtype} values")
        table = self._table(dtype)
        for k, getter in enumerate(getters):
            self._rows.append((dtype, used + k * width, width, getter))
            if self._immediate:
                self._write(dtype, used + k * width, width, getter)
        self._used[dtype] = used + width * len(getters)
        if self._immediate:
            self._upload(dtype)
        return table, used

    def placeholder_seed(self) -> int:
        """A seed that stands for the next draw of ``pycnn.random`` at each replay."""
        if not self._recording:
            _, base = self._replayed_rows(np.dtype(np.uint64), 1, 1)
            return next(seed for seed, index in self._seeds.items() if index == base)
        _, base = self.values(np.uint64, [lambda: (np.uint64(seed_key(_random.draw_seed())),)], 1)
        seed = self.PLACEHOLDER_BASE + len(self._seeds)
        self._seeds[seed] = base
        return seed

    def key_of(self, seed):
        index = self._seeds.get(int(seed)) if isinstance(seed, (int, np.integer)) else None
        return None if index is None else (self._device[np.dtype(np.uint64)], index)

    def is_placeholder(self, seed) -> bool:
        return isinstance(seed, (int, np.integer)) and int(seed) in self._seeds

    def check_host_draw(self, seed) -> None:
        """A draw on the host (``_util.uniform``) runs once at capture: a placeholder seed,
        which stands for a new draw at each replay, cannot be drawn there."""
        if self.is_placeholder(seed):
            raise GraphCaptureError("a random op outside the cuda kernels (NumPy reference or C++)")

    def on_replay(self, hook) -> None:
        """Call ``hook()`` at every replay: host-side bookkeeping of a captured launch (the
        loss's label check marks its error buffer to be read)."""
        if self._recording:
            self._hooks.append(hook)

    # ---------------------------------------------------------------- each step
    def refresh(self) -> None:
        """Run every getter in registration order, copy the values to the device and redo
        the launches' host-side bookkeeping."""
        for dtype, base, width, getter in self._rows:
            self._write(dtype, base, width, getter)
        for dtype in self._used:
            self._upload(dtype)
        for hook in self._hooks:
            hook()

    def begin_replay(self) -> None:
        self._recording, self._cursor = False, 0

    def end_replay(self) -> None:
        if self._cursor != len(self._rows):
            raise GraphCaptureError(f"the replayed step registered {self._cursor} per-step values, "
                                    f"the captured one {len(self._rows)}")

    # ---------------------------------------------------------------- internals
    def allocate(self, dtypes) -> None:
        """Make the tables of ``dtypes`` now, before a capture: inside one, the zero fill of
        a new table would be captured too and run at every replay, after the refresh."""
        for dtype in map(np.dtype, dtypes):
            if dtype not in self._device:
                self._host[dtype] = np.zeros(CAPACITY, dtype)
                self._device[dtype] = self._xp.zeros(CAPACITY, dtype)

    def _table(self, dtype):
        if dtype not in self._device:
            held = ", ".join(map(str, self._device))
            raise GraphCaptureError(f"per-step {dtype} values (the live tables hold {held})")
        return self._device[dtype]

    def _write(self, dtype, base, width, getter) -> None:
        row = tuple(getter())
        if len(row) != width:
            raise GraphCaptureError(f"a per-step getter returned {len(row)} values, expected {width}")
        self._host[dtype][base:base + width] = row

    def _upload(self, dtype) -> None:
        used = self._used[dtype]
        device = self._device[dtype]
        if self._xp is np:
            device[:used] = self._host[dtype][:used]
        else:  # on the current stream: after the previous replay read it, before the next one
            device[:used].set(self._host[dtype][:used], stream=self._xp.cuda.get_current_stream())

    def _replayed_rows(self, dtype, count: int, width: int):
        rows = self._rows[self._cursor:self._cursor + count]
        if len(rows) != count or any(r[0] != dtype or r[2] != width for r in rows) or \
                any(rows[k][1] != rows[0][1] + k * width for k in range(count)):
            raise GraphCaptureError(f"the replayed step asked for per-step values ({count} x {width} {dtype}) "
                                    f"that the captured one did not, at row {self._cursor}")
        self._cursor += count
        return self._device[dtype], rows[0][1]


@contextlib.contextmanager
def _live(table: LiveTable):
    """Make ``table`` the live table: placeholder seeds, optimizer getters, live keys."""
    if _active.get() is not None:
        raise GraphCaptureError("a CUDA graph capture is already in progress")
    token = _active.set(table)
    seeds = _random.set_seed_source(table.placeholder_seed)
    try:
        yield table
    finally:
        _random.reset_seed_source(seeds)
        _active.reset(token)


# ------------------------------------------------------------------------ the graphs

def _kind(x) -> str | None:
    """'cupy' (real graphs), 'emulated' (the simulator running the cuda backend on NumPy
    arrays) or None (host arrays: the step runs as it is)."""
    if is_cuda_array(x):
        return "cupy"
    if isinstance(x, np.ndarray) and routing.forced_backend() == "cuda" and routing.cuda_simulated():
        return "emulated"
    return None


def _data(a):
    return a.data if isinstance(a, Tensor) else a


class _Graph:
    """One captured step: static inputs, its live table, its output, what makes it stale."""

    def __init__(self, kind, fn, x, y, watched):
        self.kind, self.watched = kind, watched
        xp = np if kind == "emulated" else __import__("cupy")
        self.static_x = xp.empty(x.shape, x.dtype)
        self.static_y = xp.empty(y.shape, y.dtype)
        self.table = LiveTable(xp, immediate=(kind == "emulated"))
        self.table.allocate(LIVE_DTYPES)
        self._fn = fn
        self._copy_in(x, y)
        if kind == "emulated":
            self._capture_emulated()
        else:
            self._capture_cupy()

    def _copy_in(self, x, y) -> None:
        """x and y into the static buffers, on the current stream (after the previous replay
        that read them): a device copy, or one upload of host values (labels, say)."""
        for static, value in ((self.static_x, x), (self.static_y, y)):
            if self.kind != "cupy":
                static[...] = value
                continue
            cupy = sys.modules["cupy"]
            if is_cuda_array(value):
                static[...] = cupy.asarray(value)  # a PyTorch tensor too
            else:
                static.set(np.asarray(value, static.dtype), stream=cupy.cuda.get_current_stream())

    def _run(self):
        return self._fn(Tensor(self.static_x), self.static_y)

    # -------------------------------------------------------------- CuPy stream capture
    def _capture_cupy(self) -> None:
        import cupy
        current = cupy.cuda.get_current_stream()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._pool = cupy.cuda.MemoryPool()  # the graph's own: its addresses are never handed out again
        self._stream.wait_event(current.record())
        with self._stream, cupy.cuda.using_allocator(self._pool.malloc):
            self._stream.begin_capture()
            try:
                with _live(self.table):
                    self.output = self._run()
            except BaseException:
                with contextlib.suppress(Exception):
                    self._stream.end_capture()
                raise
            self._graph = self._stream.end_capture()
        # the capture executed nothing: this call's step is the first replay
        self.replay_now()

    def replay_now(self) -> None:
        import cupy
        self.table.refresh()
        self._graph.launch(stream=cupy.cuda.get_current_stream())

    # -------------------------------------------------------------- the emulation
    def _capture_emulated(self) -> None:
        launch = cuda_backend.kernel_module("_launch")
        self._trace = []
        with launch.tracing(self._trace), _live(self.table):
            self.output = self._run()  # executes while recording: this call's step

    def _replay_emulated(self):
        launch = cuda_backend.kernel_module("_launch")
        self.table.refresh()
        trace: list = []
        self.table.begin_replay()
        with launch.tracing(trace), _live(self.table):
            output = self._run()
        self.table.end_replay()
        if len(trace) != len(self._trace):
            raise GraphCaptureError(f"the replayed step launched {len(trace)} kernels, the captured one "
                                    f"{len(self._trace)}")
        for i, (got, captured) in enumerate(zip(trace, self._trace)):
            if got != captured:
                raise GraphCaptureError(f"launch {i} of the replayed step ({got[0]}) differs from the captured "
                                        f"one: {got[1:]} != {captured[1:]} (a per-step value passed by value)")
        return output

    def __call__(self, x, y):
        """What ``fn`` returned at capture, its arrays rewritten by this replay (the
        emulation: what the replayed ``fn`` returned)."""
        self._copy_in(x, y)
        if self.kind == "emulated":
            return self._replay_emulated()
        self.replay_now()
        return self.output


class GraphedStep:
    """``fn(x, y)`` (zero_grad, forward, backward, optimizer step; x a Tensor, y an array)
    run as a captured CUDA graph after ``warmup`` eager calls; see the module's text.  Each
    call returns what ``fn`` returned when it was captured (the loss Tensor, say), whose
    arrays the replay has rewritten: read them before the next call.

    ``optimizer`` and ``model`` (optional) tell when a graph is stale: a parameter array
    replaced, an optimizer setting other than lr changed, the model in evaluation mode.
    Host (NumPy) inputs run ``fn`` as it is: graphs are for CUDA arrays."""

    def __init__(self, fn, *, optimizer=None, model=None, warmup: int = 1, max_graphs: int = 4):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1 (the optimizer's first step is eager), got {warmup!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.fn, self.optimizer, self.model = fn, optimizer, model
        self.warmup, self.max_graphs = warmup, max_graphs
        self.eager_calls = 0
        self.replays = 0
        self.captures = 0
        self.disabled: str | None = None  # why the step runs eagerly for good
        self._graphs: dict = {}

    def __call__(self, x, y):
        x, y = _data(x), _data(y)
        kind = _kind(x)
        if kind is None or self.disabled is not None or self.eager_calls < self.warmup:
            return self._eager(x, y)
        if self.model is not None and not getattr(self.model, "training", True):
            return self._eager(x, y)  # evaluation mode: a different step
        key = (x.shape, x.dtype.str, y.shape, y.dtype.str)
        graph = self._graphs.get(key)
        if graph is not None and _unchanged(graph.watched):
            self.replays += 1
            return graph(x, y)
        self._graphs.pop(key, None)
        if len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        try:
            graph = _Graph(kind, self.fn, x, y, self._watch())
        except GraphCaptureError as exc:
            return self._give_up(str(exc), x, y)
        except Exception as exc:  # noqa: BLE001 - whatever the driver refused: say it, run eagerly
            if kind == "emulated":
                raise
            return self._give_up(f"{type(exc).__name__}: {exc}", x, y)
        self.captures += 1
        self._graphs[key] = graph
        return graph.output

    def _eager(self, x, y):
        self.eager_calls += 1
        return self.fn(Tensor(x), y)

    def _give_up(self, why: str, x, y):
        self.disabled = why
        self._graphs.clear()
        warnings.warn(f"pycnn: the training step runs without a CUDA graph: {why}", RuntimeWarning, stacklevel=3)
        return self._eager(x, y)

    def _watch(self) -> list:
        """What a captured graph bakes in besides the inputs and the live values, as
        (dict, key, value) to compare: the arrays it reads and writes (parameters, buffers,
        optimizer state: replaced ones are not seen by the graph; compared by identity),
        the optimizer's settings other than lr, and the modules' own settings (training
        mode, batch norm's momentum, a dropout probability, ...)."""
        watched = []
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                watched += [(group, k, v) for k, v in group.items() if k not in ("params", "lr", "initial_lr")]
                for p in group["params"]:
                    watched.append((vars(p), "data", p.data))
                    state = self.optimizer.state.get(id(p), {})
                    watched += [(state, k, v) for k, v in state.items() if _is_array(v)]
        if self.model is not None:
            for _, module in self.model.named_modules():
                own = vars(module)
                watched += [(own, k, v) for k, v in own.items() if isinstance(v, (bool, int, float, str))]
                watched += [(vars(p), "data", p.data) for p in module._parameters.values() if p is not None]
                watched += [(module._buffers, k, b) for k, b in module._buffers.items()]
        return watched


_MISSING = object()


def _unchanged(watched) -> bool:
    for owner, key, value in watched:
        now = owner.get(key, _MISSING)
        if now is not value and (_is_array(value) or now != value):
            return False
    return True


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) or is_cuda_array(a)
