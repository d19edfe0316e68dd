"""The benchmark cases of pycnn and their timing harness: ``pycnn bench`` prints them as one
table; ``bench/`` (pytest-benchmark) times the same cases with its own machinery.

Each case is (op, algorithm, shape, pass).  It first checks pycnn's result against the NumPy
reference (np.testing), then times the registered "cpp" implementation as autograd calls it
(wrappers and output allocation included) and PyTorch CPU on the same arrays, both on 2
threads; times are medians of repeated runs after warm-up.  Without torch the torch columns
are empty.

Shapes (issue 3), float32, batch N = 32:
  conv3x3        (C, K, H=W) in CONV_SHAPES, each algorithm: direct, winograd, auto
  conv3x3_act    conv3x3 + bias + relu fused, on FUSED_SHAPES, next to the unfused pair
  pooling and every activation with a C++ kernel: x of shape MAP_SHAPES

Work and limits:
  conv3x3: GFLOP/s of the direct convolution (registry ``op.flops``: 2*N*K*C*9*H*W for the
    forward; fwd+bwd counts 3x that: grad_x and grad_weight each cost a forward); the limit
    is the FMA peak of the 2 threads measured by ``_C.fma_peak_gflops`` (Winograd does fewer
    FLOPs than it is credited with, so it may pass 1.0).
  memory-bound ops: GB/s of the bytes read + written (``pass_bytes``); the limit is a copy of
    the same number of bytes (a copy of B/2 bytes reads B/2 and writes B/2) by torch's copy_
    on 2 threads (np.copyto, one thread, without torch).  Arrays of these sizes (4-8 MiB) are
    partly cache-resident, which the copy of the same size reproduces.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from typing import Callable

import numpy as np

from pycnn.autograd import Context
from pycnn.ops import registry

N = 32
THREADS = 2
ITEMSIZE = 4  # float32
PHASES = ("fwd", "fwd+bwd")
CONV_SHAPES = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8)]  # (C, K, H=W)
CONV_ALGOS = ("direct", "winograd", "auto")
FUSED_SHAPES = [(64, 64, 32), (128, 128, 16)]  # conv3x3_act (relu) vs conv3x3 then relu
MAP_SHAPES = [(32, 64, 32, 32), (32, 128, 16, 16)]  # (N, C, H, W): pooling and activations
POOL_OPS = ("maxpool2x2", "avgpool2x2")
JSON_KEYS = ("op", "algo", "shape", "pass", "pycnn_ms", "torch_ms", "speedup", "gbps", "gflops", "limit_fraction")


# ------------------------------------------------------------------------------- the ops
@dataclasses.dataclass(frozen=True)
class MapOp:
    """A memory-bound op on x (N, C, H, W): its params, its extra input and its torch form
    ``torch_fn(F, x, w, **params)`` (w: the extra input or None)."""
    params: dict
    torch_fn: Callable
    weight: Callable | None = None  # (rng, channels) -> the extra input (prelu's slopes)
    random: bool = False            # torch draws its own numbers: its output is not compared


def _maxout_torch(F, x, w, pieces=2):
    n, c = x.shape[:2]
    return x.reshape((n, c // pieces, pieces) + tuple(x.shape[2:])).max(dim=2).values


ACTIVATIONS = {
    "relu": MapOp({}, lambda F, x, w: F.relu(x)),
    "leaky_relu": MapOp({"slope": 0.01}, lambda F, x, w, slope: F.leaky_relu(x, slope)),
    "prelu": MapOp({}, lambda F, x, w: F.prelu(x, w), weight=lambda rng, c: rng.uniform(0.05, 0.3, c)),
    # torch's bounds are the slopes themselves: U(1/8, 1/3) ~ our 1 / U(3, 8)
    "rrelu": MapOp({"training": True, "seed": 1},
                   lambda F, x, w, training, seed: F.rrelu(x, 1 / 8, 1 / 3, training=training), random=True),
    "elu": MapOp({"alpha": 1.0}, lambda F, x, w, alpha: F.elu(x, alpha)),
    "sigmoid": MapOp({}, lambda F, x, w: x.sigmoid()),
    "tanh": MapOp({}, lambda F, x, w: x.tanh()),
    "maxout": MapOp({"pieces": 2}, _maxout_torch),
}
POOLS = {
    "maxpool2x2": MapOp({}, lambda F, x, w: F.max_pool2d(x, 2)),
    "avgpool2x2": MapOp({}, lambda F, x, w: F.avg_pool2d(x, 2)),
}
# memory-bound ops that bench/ times but the table leaves out (not an activation)
OTHER_MAPS = {
    "dropout": MapOp({"p": 0.5, "seed": 1, "training": True},
                     lambda F, x, w, p, seed, training: F.dropout(x, p, training=training), random=True),
}
MAP_OPS = {**ACTIVATIONS, **POOLS, **OTHER_MAPS}


# The state the C++ forward writes for its backward pass, in bytes, for x with E elements:
# the winner of each window (maxpool2x2, maxout), one uint8 per output element.
SAVED_BYTES = {"maxpool2x2": lambda e, params: e // 4, "maxout": lambda e, params: e // params.get("pieces", 2)}


def pass_bytes(op: str, phase: str, x_shape, params=None) -> int:
    """Bytes read + written by one pass of a memory-bound op on x (float32, E = elements of x).

    fwd: the registry's count (``op.bytes``: read x, write y -- maps 2 * 4E, pooling 4E + E,
    maxout(k) 4E + 4E/k), plus the state the C++ forward keeps for backward (SAVED_BYTES:
    maxpool E/4, maxout E/k).  The backward pass, written out here:
      maps (relu ... elu): read x and grad_y, write grad_x                      3 * 4E
      sigmoid, tanh: read y and grad_y, write grad_x                           3 * 4E
        (prelu's weight and grad_weight are O(C): left out; rrelu regenerates its slopes)
      dropout: read grad_y, write grad_x (the mask is drawn again from the seed) 2 * 4E
      maxout(k): read grad_y (4E/k) and the winners (E/k), write grad_x (4E)    4E + 5E/k
      maxpool2x2: read grad_y (E) and the winners (E/4), write grad_x (4E)      5.25E
      avgpool2x2: read grad_y (E), write grad_x (4E)                            5E
    fwd+bwd: the sum."""
    params = dict(params or {})
    elements = int(np.prod(x_shape))
    shapes = (x_shape, (x_shape[1],)) if op == "prelu" else (x_shape,)
    saved = SAVED_BYTES[op](elements, params) if op in SAVED_BYTES else 0
    fwd = int(registry.get(op).bytes(*shapes, itemsize=ITEMSIZE, **params)) + saved
    if phase == "fwd":
        return fwd
    if op == "maxout":
        bwd = ITEMSIZE * elements + (ITEMSIZE * elements) // params.get("pieces", 2) + saved
    elif op == "maxpool2x2":
        bwd = ITEMSIZE * elements + (ITEMSIZE * elements) // 4 + saved
    elif op == "avgpool2x2":
        bwd = ITEMSIZE * elements + (ITEMSIZE * elements) // 4
    elif op == "dropout":
        bwd = 2 * ITEMSIZE * elements
    else:
        bwd = 3 * ITEMSIZE * elements
    return fwd + bwd


def conv_flops(shape, phase: str, op: str = "conv3x3", params=None) -> int:
    """FLOPs of conv3x3 (or conv3x3_act) at (C, K, H=W), batch N: the registry's forward
    count; fwd+bwd = 3x the convolution's forward (grad_x and grad_weight each cost one)."""
    c, k, h = shape
    x_shape, w_shape = (N, c, h, h), (k, c, 3, 3)
    fwd = registry.get(op).flops(x_shape, w_shape, (k,), None, **(params or {})) if op == "conv3x3_act" else \
        registry.get("conv3x3").flops(x_shape, w_shape, (k,))
    return fwd if phase == "fwd" else fwd + 2 * registry.get("conv3x3").flops(x_shape, w_shape, (k,))


# ------------------------------------------------------------------------------ the data
@functools.lru_cache(maxsize=4)
def conv_data(shape):
    """x (N, C, H, W), weight (K, C, 3, 3), bias (K,), an upstream gradient (N, K, H, W)."""
    c, k, h = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, c, h, h), dtype=np.float32)
    w = rng.standard_normal((k, c, 3, 3), dtype=np.float32) / np.float32(np.sqrt(9 * c))
    b = rng.standard_normal(k, dtype=np.float32)
    g = rng.standard_normal((N, k, h, h), dtype=np.float32)
    return x, w, b, g


@functools.lru_cache(maxsize=8)
def map_data(op: str, shape):
    """The inputs of a memory-bound op on x of ``shape`` and an upstream gradient."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    spec = MAP_OPS[op]
    inputs = (x,) if spec.weight is None else (x, spec.weight(rng, shape[1]).astype(np.float32))
    y_shape = _out_shape(op, shape, spec.params)
    g = rng.standard_normal(y_shape, dtype=np.float32)
    return inputs, g


def _out_shape(op, shape, params):
    n, c, h, w = shape
    if op in POOL_OPS:
        return (n, c, h // 2, w // 2)
    if op == "maxout":
        return (n, c // params.get("pieces", 2), h, w)
    return shape


# ------------------------------------------------------------------------------ the runs
def run_impl(impl, phase: str, inputs, params, grad):
    """(output, gradients or ()) of one registry implementation, as autograd calls it."""
    ctx = Context(tuple(x is not None for x in inputs))
    y = impl.forward(ctx, *inputs, **params)
    return y, (tuple(impl.backward(ctx, grad)) if phase == "fwd+bwd" else ())


def run_unfused(conv, act, phase: str, x, w, b, g, act_inputs=(), act_params=None):
    """act(conv(x, w, b)) as two registry calls (and their backward): what conv3x3_act fuses."""
    cctx, actx = Context((True,) * 3), Context((True,) * (1 + len(act_inputs)))
    y = act.forward(actx, conv.forward(cctx, x, w, b), *act_inputs, **(act_params or {}))
    if phase == "fwd+bwd":
        conv.backward(cctx, act.backward(actx, g)[0])
    return y


def cpp_impl(op: str, algo: str = "default", shapes=None):
    """The registered C++ implementation (None where the extension lacks it); ``auto`` is
    resolved with the op's own choice for these input shapes."""
    spec = registry.get(op)
    available = spec.algorithms("cpp")
    if algo == "auto":
        if not available:
            return None
        algo = spec.choose_algo("cpp", shapes, {}) if spec.choose_algo and len(available) > 1 else available[0]
    return spec.impls.get(("cpp", algo))


def check_conv(impl, phase, x, w, b, g, op="conv3x3", params=None, prelu_weight=None, rtol=1e-5):
    """impl vs the float64 NumPy reference on the first 2 images of the batch (the reference
    takes seconds on the whole batch); tolerances relative to the largest value.  op
    conv3x3_act takes ``params`` (activation, slope, alpha) and ``prelu_weight``."""
    params = dict(params or {})
    extra = (prelu_weight,) if op == "conv3x3_act" else ()
    sub = (x[:2], w, b) + extra
    y, grads = run_impl(impl, phase, sub, params, g[:2])
    ref = registry.get(op).reference
    y_ref, grads_ref = run_impl(ref, phase, tuple(None if a is None else a.astype(np.float64) for a in sub), params,
                                g[:2].astype(np.float64))
    names = ("y", "grad_x", "grad_weight", "grad_bias", "grad_prelu_weight")
    for name, got, want in zip(names, (y, *grads), (y_ref, *grads_ref)):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()), err_msg=name)


def check_map(op, phase, y, grads, inputs, g):
    """pycnn's output and gradients vs the float32 NumPy reference on the whole input."""
    params = MAP_OPS[op].params
    y_ref, grads_ref = run_impl(registry.get(op).reference, phase, inputs, params, g)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-6, err_msg=f"{op} forward")
    for got, want in zip(grads, grads_ref):
        # prelu's grad_weight sums 32K products: float32 reference sums vs double sums
        tol = dict(rtol=2e-5, atol=2e-6) if want.size > 1024 else dict(rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got, want, **tol, err_msg=f"{op} gradient")


def torch_module():
    """torch on THREADS threads, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    return torch


def torch_conv_runner(torch, phase, x, w, b, g, activation=None):
    """A closure running F.conv2d (+ F.relu) on the arrays, through autograd for fwd+bwd."""
    import torch.nn.functional as F
    xt, wt, bt, gt = (torch.from_numpy(a) for a in (x, w, b, g))

    def forward(*leaves):
        y = F.conv2d(*leaves, padding=1)
        return F.relu(y) if activation == "relu" else y

    def run():
        if phase == "fwd":
            with torch.no_grad():
                return forward(xt, wt, bt)
        leaves = [a.detach().requires_grad_() for a in (xt, wt, bt)]
        y = forward(*leaves)
        y.backward(gt)
        return y.detach()
    return run


def torch_map_runner(torch, op, phase, inputs, g):
    """A closure running the torch form of a memory-bound op: (output, input gradients)."""
    import torch.nn.functional as F
    spec = MAP_OPS[op]
    tensors = [torch.from_numpy(a) for a in inputs]
    gt = torch.from_numpy(g)

    def run():
        if phase == "fwd":
            with torch.no_grad():
                x = tensors[0]
                return spec.torch_fn(F, x, tensors[1] if len(tensors) > 1 else None, **spec.params), ()
        leaves = [t.detach().requires_grad_() for t in tensors]
        y = spec.torch_fn(F, leaves[0], leaves[1] if len(leaves) > 1 else None, **spec.params)
        y.backward(gt)
        return y.detach(), tuple(t.grad for t in leaves)
    return run


def copy_runner(nbytes: int, torch=None):
    """A copy moving ``nbytes`` (reads nbytes/2, writes nbytes/2): torch copy_ on THREADS
    threads, else np.copyto (one thread)."""
    src = np.random.default_rng(0).standard_normal(max(nbytes // 2 // ITEMSIZE, 1), dtype=np.float32)
    dst = np.empty_like(src)
    if torch is not None:
        s, d = torch.from_numpy(src), torch.from_numpy(dst)
        run = functools.partial(d.copy_, s)
    else:
        run = functools.partial(np.copyto, dst, src)
    run()
    np.testing.assert_array_equal(dst, src)
    return run


# ---------------------------------------------------------------------------- the timing
@dataclasses.dataclass
class Timer:
    """Medians of repeated runs: ``warmup`` untimed calls, then as many timed calls as fit in
    ``budget_s`` (at least ``min_rounds``, at most ``max_rounds``)."""
    budget_s: float = 0.25
    min_rounds: int = 5
    max_rounds: int = 200
    warmup: int = 2

    def median(self, fn) -> float:
        for _ in range(max(self.warmup - 1, 0)):
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        rounds = int(min(max(self.budget_s / once, self.min_rounds), self.max_rounds))
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


FULL = Timer(budget_s=0.5, min_rounds=7)
QUICK = Timer(budget_s=0.02, min_rounds=2, max_rounds=10, warmup=1)


# ---------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Case:
    op: str       # the op as the table shows it (conv3x3+relu: the unfused pair)
    algo: str
    shape: tuple  # conv: (C, K, H=W) at batch N; others: x (N, C, H, W)
    phase: str
    group: str    # what --ops selects it by

    @property
    def shape_text(self) -> str:
        if self.group in ("conv3x3", "conv3x3_act"):
            c, k, h = self.shape
            return f"C{c} K{k} H{h}"
        return "x".join(map(str, self.shape))


def cases(quick: bool = False, ops=None) -> list[Case]:
    """Every case (``quick``: the first shape of each list), optionally only the ops named."""
    conv_shapes = CONV_SHAPES[1:2] if quick else CONV_SHAPES
    fused_shapes = FUSED_SHAPES[:1] if quick else FUSED_SHAPES
    map_shapes = MAP_SHAPES[:1] if quick else MAP_SHAPES
    out = []
    for shape in conv_shapes:
        for phase in PHASES:
            out += [Case("conv3x3", algo, shape, phase, "conv3x3") for algo in CONV_ALGOS]
    for shape in fused_shapes:
        for phase in PHASES:
            out += [Case("conv3x3_act", "auto", shape, phase, "conv3x3_act"),
                    Case("conv3x3+relu", "auto", shape, phase, "conv3x3_act")]
    for op in POOL_OPS + tuple(ACTIVATIONS):
        for shape in map_shapes:
            out += [Case(op, "default", shape, phase, op) for phase in PHASES]
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

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("phase")
        return {key: d[key] for key in JSON_KEYS}


class Bench:
    """Runs cases: checks, times, and turns the medians into rows."""

    def __init__(self, quick: bool = False, torch=None, log=None):
        self.timer = QUICK if quick else FULL
        self.torch = torch
        self.log = log or (lambda message: None)
        self._torch_times: dict = {}
        self._copy_times: dict = {}
        self._peak = None
        self.quick = quick

    @property
    def peak_gflops(self) -> float:
        if self._peak is None:
            C = _C()
            iters = 2_000_000 if self.quick else 20_000_000
            self._peak = max(C.fma_peak_gflops(iters) for _ in range(3))
        return self._peak

    def copy_gbps(self, nbytes: int) -> float:
        if nbytes not in self._copy_times:
            self._copy_times[nbytes] = self.timer.median(copy_runner(nbytes, self.torch))
        return nbytes / self._copy_times[nbytes] / 1e9

    def run(self, case: Case) -> Row:
        self.log(f"{case.op} {case.algo} {case.shape_text} {case.phase}")
        if case.group in ("conv3x3", "conv3x3_act"):
            return self._conv(case)
        return self._map(case)

    # -- conv
    def _conv(self, case: Case) -> Row:
        x, w, b, g = conv_data(case.shape)
        c, k, h = case.shape
        shapes = [x.shape, w.shape, b.shape]
        act = {"activation": "relu"}
        if case.op == "conv3x3_act":
            impl, args, params, flops_op = cpp_impl("conv3x3_act", "auto", shapes), (x, w, b, None), act, "conv3x3_act"
            check_conv(impl, case.phase, x, w, b, g, op="conv3x3_act", params=act)
            fn = functools.partial(run_impl, impl, case.phase, args, params, g)
        elif case.op == "conv3x3+relu":  # the unfused pair, each through its registry implementation
            conv, flops_op = cpp_impl("conv3x3", "auto", shapes), "conv3x3_act"
            check_conv(conv, case.phase, x, w, b, g)
            fn = functools.partial(run_unfused, conv, cpp_impl("relu"), case.phase, x, w, b, g)
        else:
            impl, flops_op = cpp_impl("conv3x3", case.algo, shapes), "conv3x3"
            check_conv(impl, case.phase, x, w, b, g)
            fn = functools.partial(run_impl, impl, case.phase, (x, w, b), {}, g)
        t = self.timer.median(fn)
        activation = "relu" if case.group == "conv3x3_act" else None
        t_torch = self._torch_time(("conv", case.shape, case.phase, activation), lambda: self._torch_conv_runner(
            case, x, w, b, g, activation))
        flops = conv_flops(case.shape, case.phase, flops_op, act if flops_op == "conv3x3_act" else None)
        gflops = flops / t / 1e9
        return Row(case.op, case.algo, case.shape_text, case.phase, t * 1e3, _ms(t_torch), _ratio(t_torch, t),
                   None, gflops, gflops / self.peak_gflops)

    def _torch_conv_runner(self, case, x, w, b, g, activation):
        run = torch_conv_runner(self.torch, case.phase, x, w, b, g, activation)
        ours, _ = run_impl(cpp_impl("conv3x3", "direct"), "fwd", (x, w, b), {}, g)
        if activation == "relu":
            ours = np.maximum(ours, 0)
        np.testing.assert_allclose(run().numpy(), ours, rtol=1e-4, atol=1e-4, err_msg="torch conv2d")
        return run

    # -- memory-bound ops
    def _map(self, case: Case) -> Row:
        op, phase = case.op, case.phase
        inputs, g = map_data(op, case.shape)
        impl = cpp_impl(op)
        params = MAP_OPS[op].params
        y, grads = run_impl(impl, phase, inputs, params, g)
        check_map(op, phase, y, grads, inputs, g)
        t = self.timer.median(functools.partial(run_impl, impl, phase, inputs, params, g))
        t_torch = self._torch_time(("map", op, case.shape, phase), lambda: self._torch_map_runner(op, phase, inputs,
                                                                                                   g, y, grads))
        nbytes = pass_bytes(op, phase, case.shape, params)
        gbps = nbytes / t / 1e9
        return Row(op, case.algo, case.shape_text, phase, t * 1e3, _ms(t_torch), _ratio(t_torch, t), gbps, None,
                   gbps / self.copy_gbps(nbytes))

    def _torch_map_runner(self, op, phase, inputs, g, y, grads):
        run = torch_map_runner(self.torch, op, phase, inputs, g)
        if not MAP_OPS[op].random:
            y_t, grads_t = run()
            np.testing.assert_allclose(y_t.numpy(), y, rtol=1e-5, atol=1e-6, err_msg=f"torch {op}")
            for got, want in zip(grads_t, grads):
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-3, err_msg=f"torch {op} gradient")
        return run

    def _torch_time(self, key, make_runner):
        """The torch median of a (shape, pass), measured once and shared by its algorithms."""
        if self.torch is None:
            return None
        if key not in self._torch_times:
            self._torch_times[key] = self.timer.median(make_runner())
        return self._torch_times[key]


def _C():
    from pycnn.device import cpp_extension
    C = cpp_extension()
    if C is None:
        raise RuntimeError("pycnn bench needs the C++ extension pycnn._C, which is not built")
    return C


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _ratio(t_torch, t):
    return None if t_torch is None else t_torch / t


def available(case: Case) -> bool:
    """Whether the C++ backend implements the case's op."""
    ops = ("conv3x3", "relu") if case.op == "conv3x3+relu" else (case.group,)
    return all(registry.get(op).algorithms("cpp") for op in ops)


def run(quick: bool = False, ops=None, use_torch: bool = True, log=None) -> tuple[list[Row], dict]:
    """Check and time every case; returns (rows, facts about the run)."""
    C = _C()
    threads_before = C.num_threads()
    C.set_num_threads(THREADS)
    torch = torch_module() if use_torch else None
    try:
        bench = Bench(quick=quick, torch=torch, log=log)
        np.ones(24 * 2 ** 20 // 8).sum()  # raise glibc's mmap threshold before the first case (bench/conftest.py)
        selected = cases(quick, ops)
        rows = [bench.run(case) for case in selected if available(case)]
        facts = {"threads": THREADS, "torch": None if torch is None else torch.__version__,
                 "fma_peak_gflops": bench._peak, "quick": quick}
        return rows, facts
    finally:
        C.set_num_threads(threads_before)


def table(rows: list[Row], facts: dict) -> str:
    """The rows as one aligned text table, with what the columns mean."""
    header = (f"{'op':<14}{'algo':<10}{'shape':<16}{'pass':<9}{'pycnn ms':>9}{'torch ms':>9}{'speedup':>8}"
              f"{'GB/s':>7}{'GFLOP/s':>9}{'of limit':>9}")
    lines = [f"pycnn vs PyTorch CPU ({facts.get('torch') or 'torch not installed'}), {facts['threads']} threads, "
             f"float32, medians; conv batch {N}", header, "-" * len(header)]

    def num(value, width, fmt):
        return f"{'-':>{width}}" if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"{value:>{width}{fmt}}"
    for r in rows:
        lines.append(f"{r.op:<14}{r.algo:<10}{r.shape:<16}{r.phase:<9}{num(r.pycnn_ms, 9, '.3f')}"
                     f"{num(r.torch_ms, 9, '.3f')}{num(r.speedup, 7, '.2f')}{'x' if r.speedup else ' '}"
                     f"{num(r.gbps, 7, '.1f')}{num(r.gflops, 9, '.1f')}{num(r.limit_fraction, 9, '.2f')}")
    if facts.get("fma_peak_gflops"):
        lines.append(f"limit: conv = the FMA peak of {facts['threads']} threads, {facts['fma_peak_gflops']:.0f} "
                     "GFLOP/s (measured); others = a copy of the same bytes (torch copy_, "
                     f"{facts['threads']} threads)")
    else:
        lines.append("limit: a copy of the same bytes (torch copy_ on 2 threads, np.copyto without torch)")
    lines.append("speedup = torch ms / pycnn ms; conv GFLOP/s counts direct-convolution FLOPs (fwd+bwd: 3x the "
                 "forward); conv3x3+relu = conv3x3 then relu, unfused")
    return "\n".join(lines)
