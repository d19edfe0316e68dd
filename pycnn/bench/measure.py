"""How the benchmarks run one case: its data, the runs (pycnn, torch, a copy of the same
bytes), the checks against the reference and PyTorch, and the timer.  Everything about the
ops themselves (shapes, params, costs, the torch form) comes from their specs
(pycnn/ops/*.py); ``harness`` (``pycnn bench``), bench/*.py and bench/test_cuda.py use it.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import numpy as np

from pycnn.autograd import Context
from pycnn.ops import registry, routing

THREADS = 2
ITEMSIZE = 4  # float32
COMPUTE_BOUND = 4.0  # FLOPs per byte above which a case is measured against the FMA peak


# ------------------------------------------------------------------------------ the data
@functools.lru_cache(maxsize=8)
def case_data(op_name: str, index: int):
    """(inputs, params, upstream gradient) of ``registry.get(op_name).bench[index]``."""
    op = registry.get(op_name)
    case = op.bench[index]
    rng = np.random.default_rng(0)
    inputs, params = op.bench_inputs(rng, case.shapes, dict(case.params))
    y = run_impl(op.reference, "fwd", _subbatch(inputs, params, 1), params, None)[0]
    out_shape = (inputs[0].shape[0],) + tuple(y.shape[1:])
    grad = rng.standard_normal(out_shape, dtype=np.float32).astype(y.dtype, copy=False)
    return inputs, params, grad


def itemsize(inputs) -> int:
    return inputs[0].dtype.itemsize


def cost(op, case, phase: str, inputs) -> tuple[int, int]:
    """(FLOPs, bytes) of the case's pass: the spec's model."""
    return op.cost(phase, case.shapes, case.params, itemsize(inputs))


def compute_bound(op, case, inputs) -> bool:
    flops, nbytes = cost(op, case, "fwd", inputs)
    return flops > COMPUTE_BOUND * nbytes


def _subbatch(inputs, params, n):
    """The first n images (every array param must be per-op, not per-image: else all)."""
    if any(isinstance(v, np.ndarray) for v in params.values()):
        return inputs
    return (inputs[0][:n],) + tuple(inputs[1:])


# ------------------------------------------------------------------------------ the runs
def run_impl(impl, phase: str, inputs, params, grad):
    """(output, gradients or ()) of one registry implementation, as autograd calls it."""
    ctx = Context(tuple(x is not None for x in inputs))
    y = impl.forward(ctx, *inputs, **params)
    return y, (tuple(impl.backward(ctx, grad)) if phase == "fwd+bwd" else ())


def cpp_route(op, inputs, params, algo: str = "auto"):
    """The implementation the router gives the C++ backend (None where it lacks the op)."""
    if not [a for a in op.algorithms("cpp") if a != "reference"]:
        return None
    with routing.use_backend("cpp"):
        return routing.route(op, inputs, params, algo).impl


def chain_runner(op, phase, inputs, params, grad):
    """The ops that ``op`` fuses (``op.unfused``), each through its C++ route, one after the
    other (and their backward passes in reverse)."""
    steps = []
    for i, (name, extra, step_params) in enumerate(op.unfused(inputs, params)):
        route_inputs = tuple(extra) if i == 0 else (inputs[0],) + tuple(extra)  # the first takes op's inputs
        steps.append((cpp_route(registry.get(name), route_inputs, step_params), extra, step_params))

    def run():
        contexts, y = [], None
        for i, (impl, extra, step_params) in enumerate(steps):
            args = tuple(extra) if i == 0 else (y,) + tuple(extra)
            ctx = Context((True,) * len(args))
            y = impl.forward(ctx, *args, **step_params)
            contexts.append(ctx)
        if phase == "fwd+bwd":
            g = grad
            for (impl, _, _), ctx in zip(reversed(steps), reversed(contexts)):
                g = impl.backward(ctx, g)[0]
        return y
    return run


def check(op, impl, phase, inputs, params, grad, rtol=1e-5):
    """impl vs the float64 reference on the first 2 images (tolerances relative to the
    largest value)."""
    if any(a is not None and a.dtype == np.float32 for a in inputs):
        rtol *= getattr(impl, "rounding", 1.0)  # an algorithm that rounds more says so (winograd4)
    sub = _subbatch(inputs, params, 2)
    g = grad[:sub[0].shape[0]]
    y, grads = run_impl(impl, phase, sub, params, g)
    wide = tuple(a.astype(np.float64) if a is not None and a.dtype == np.float32 else a for a in sub)
    y_ref, grads_ref = run_impl(op.reference, phase, wide, params, g.astype(np.float64))
    for name, got, want in zip(("y", "grad 0", "grad 1", "grad 2", "grad 3"), (y, *grads), (y_ref, *grads_ref)):
        if want is not None and got is not None:
            scale = float(np.abs(want).max()) if want.size else 0.0
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=f"{op.name} {name}")


def torch_module():
    """torch on THREADS threads, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    return torch


def torch_runner(torch, op, phase, inputs, params, grad, device="cpu"):
    """A closure running the op's torch form (``torch_native`` where torch draws its own
    random numbers) -> (output, input gradients); and whether its result can be compared."""
    fn = op.torch_native or op.torch
    tensors = [None if a is None else torch.as_tensor(a, device=device) for a in inputs]
    differentiable = [t is not None and t.dtype.is_floating_point for t in tensors]
    gt = torch.as_tensor(grad, device=device)

    def run():
        if phase == "fwd":
            with torch.no_grad():
                return fn(*tensors, **params), ()
        leaves = [t.detach().requires_grad_() if d else t for t, d in zip(tensors, differentiable)]
        y = fn(*leaves, **params)
        y.backward(gt)
        return y.detach(), tuple(t.grad for t, d in zip(leaves, differentiable) if d)
    return run, op.torch_native is None


def check_torch(op, run, y, grads):
    y_t, grads_t = run()
    scale = max(float(np.abs(y).max()), 1.0)
    np.testing.assert_allclose(y_t.cpu().numpy(), y, rtol=1e-4, atol=1e-5 * scale, err_msg=f"torch {op.name}")
    for got, want in zip(grads_t, grads):
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-4, atol=1e-3 * max(float(np.abs(want).max()), 1),
                                   err_msg=f"torch {op.name} gradient")


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
        return statistics.median(self.times(fn))

    def times(self, fn) -> list[float]:
        """The timed runs' seconds (after the warm-up)."""
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
        return times


def spread(times) -> float:
    """Run-to-run spread of timed runs: the interquartile range over the median."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(times)


FULL = Timer(budget_s=0.5, min_rounds=7)
QUICK = Timer(budget_s=0.02, min_rounds=2, max_rounds=10, warmup=1)
