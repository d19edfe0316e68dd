"""Rectifier benchmarks: pycnn "cpp" vs its bare kernel vs the NumPy reference vs PyTorch CPU
vs a NumPy copy of the same bytes (the memory limit of a map).

    pytest bench/test_activations.py --benchmark-only

Every case checks its result against the NumPy reference before it is timed.

Bytes (float32, N = number of elements of x, 4 bytes each):
    forward:   read x, write y                        -> 2 * 4 * N
    backward:  read x and grad_out, write grad_in     -> 3 * 4 * N
    fwd+bwd:   both                                   -> 5 * 4 * N
  (prelu's weight, grad_weight and per-row sums are O(N*C) or less: left out; rrelu's slopes
  are regenerated from the seed, never stored: no extra bytes.)
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from pycnn.autograd import Context
from pycnn.ops import registry

SHAPES = [(32, 64, 32, 32), (32, 128, 16, 16)]
PHASES = ["fwd", "fwd+bwd"]
ARRAYS_TOUCHED = {"fwd": 2, "fwd+bwd": 5}
ITEMSIZE = 4  # float32
ROUND_BUDGET_S = 0.3  # per case: rounds = budget / (time of one call), within ROUND_LIMITS
ROUND_LIMITS = (5, 300)
TOL = dict(rtol=2e-5, atol=2e-6)


def _pedantic(benchmark, fn, *args):
    """benchmark.pedantic with warm-up rounds and as many rounds as fit in ROUND_BUDGET_S."""
    import time
    fn(*args)  # warm-up (and page-in) before the estimate
    start = time.perf_counter()
    fn(*args)
    once = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(max(ROUND_BUDGET_S / once, ROUND_LIMITS[0]), ROUND_LIMITS[1]))
    benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=2)


def _nbytes(shape, phase):
    return ARRAYS_TOUCHED[phase] * ITEMSIZE * int(np.prod(shape))


# ------------------------------------------------------------------------------ the ops
# params: the keyword arguments of the registry op; kernel: (C, x, w, g, out, gw, params)
# calls into _C (forward, backward); torch: (F, x, w) -> y.

def _torch_fns():
    return {
        "relu": lambda F, x, w: F.relu(x),
        "leaky_relu": lambda F, x, w: F.leaky_relu(x, 0.01),
        "prelu": lambda F, x, w: F.prelu(x, w),
        # torch's bounds are the slopes themselves: U(1/8, 1/3) ~ our 1 / U(3, 8)
        "rrelu": lambda F, x, w: F.rrelu(x, 1 / 8, 1 / 3, training=True),
        "elu": lambda F, x, w: F.elu(x, 1.0),
    }


OPS = {
    "relu": dict(params={},
                 fwd=lambda C, x, w, out, p: C.relu_forward(x, out),
                 bwd=lambda C, x, w, g, gi, gw, p: C.relu_backward(x, g, gi)),
    "leaky_relu": dict(params={"slope": 0.01},
                       fwd=lambda C, x, w, out, p: C.leaky_relu_forward(x, out, p["slope"]),
                       bwd=lambda C, x, w, g, gi, gw, p: C.leaky_relu_backward(x, g, gi, p["slope"])),
    "prelu": dict(params={},
                  fwd=lambda C, x, w, out, p: C.prelu_forward(x, w, out),
                  bwd=lambda C, x, w, g, gi, gw, p: C.prelu_backward(x, w, g, gi, gw)),
    "rrelu": dict(params={"training": True, "seed": 1},
                  fwd=lambda C, x, w, out, p: C.rrelu_forward(x, out, 3.0, 8.0, p["seed"], True),
                  bwd=lambda C, x, w, g, gi, gw, p: C.rrelu_backward(x, g, gi, 3.0, 8.0, p["seed"], True)),
    "elu": dict(params={"alpha": 1.0},
                fwd=lambda C, x, w, out, p: C.elu_forward(x, out, p["alpha"]),
                bwd=lambda C, x, w, g, gi, gw, p: C.elu_backward(x, g, gi, p["alpha"])),
}

CASES = [(op, phase, shape) for op in OPS for phase in PHASES for shape in SHAPES]
IDS = [f"{op}-{phase}-{'x'.join(map(str, shape))}" for op, phase, shape in CASES]


@functools.lru_cache(maxsize=4)
def _data(op, shape):
    """x (N, C, H, W), the prelu weight (C,) (None for the others), an upstream gradient."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    w = rng.uniform(0.05, 0.3, shape[1]).astype(np.float32) if op == "prelu" else None
    return x, w, g


def _inputs(op, x, w):
    return (x, w) if op == "prelu" else (x,)


def _run(impl, op, phase, x, w, g):
    """(output, gradients or ()) of a registry implementation."""
    inputs = _inputs(op, x, w)
    ctx = Context((True,) * len(inputs))
    y = impl.forward(ctx, *inputs, **OPS[op]["params"])
    return y, (impl.backward(ctx, g) if phase == "fwd+bwd" else ())


@functools.lru_cache(maxsize=8)
def _expected(op, phase, shape):
    x, w, g = _data(op, shape)
    return _run(registry.get(op).reference, op, phase, x, w, g)


def _check(op, phase, shape, y, grads):
    y_ref, grads_ref = _expected(op, phase, shape)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(grads, grads_ref):
        # prelu's grad_weight sums 32K products: float32 reference sums vs double sums
        np.testing.assert_allclose(a, b, **(TOL if a.size > 1024 else dict(rtol=1e-4, atol=1e-3)))


# ------------------------------------------------------------------------------- benches
# One test per (op, pass, shape, impl), impl varying fastest: the implementations of a case
# run back to back, so that a burst of load on this shared machine hits them alike.

IMPLS = ["pycnn", "kernel", "numpy", "torch", "copy-numpy", "copy-torch"]
BENCH_CASES = [(op, phase, shape, impl) for op, phase, shape in CASES for impl in IMPLS]
BENCH_IDS = [f"{case_id}-{impl}" for case_id in IDS for impl in IMPLS]


@pytest.mark.parametrize("op, phase, shape, impl", BENCH_CASES, ids=BENCH_IDS)
def test_activation(benchmark, record, op, phase, shape, impl):
    benchmark.group = f"{op} {phase} {shape}"
    if impl.startswith("copy"):
        _bench_copy(benchmark, impl.split("-")[1], phase, shape)
    else:
        {"pycnn": _bench_pycnn, "kernel": _bench_kernel, "numpy": _bench_numpy, "torch": _bench_torch}[impl](
            benchmark, op, phase, shape)
    record((op, phase, shape), impl, _nbytes(shape, phase))


def _bench_pycnn(benchmark, op, phase, shape):
    """The registered "cpp" implementation, as autograd calls it (allocation included)."""
    _C_module()
    impl = _cpp_impl(op)
    x, w, g = _data(op, shape)
    _check(op, phase, shape, *_run(impl, op, phase, x, w, g))
    _pedantic(benchmark, _run, impl, op, phase, x, w, g)


def _bench_kernel(benchmark, op, phase, shape):
    """The bare _C calls into preallocated outputs: no wrapper, no allocation."""
    C = _C_module()
    x, w, g = _data(op, shape)
    spec, params = OPS[op], OPS[op]["params"]
    out, gi = np.full_like(x, np.nan), np.full_like(x, np.nan)
    gw = None if w is None else np.full_like(w, np.nan)

    def run():
        spec["fwd"](C, x, w, out, params)
        if phase == "fwd+bwd":
            spec["bwd"](C, x, w, g, gi, gw, params)

    run()
    _check(op, phase, shape, out, () if phase == "fwd" else ((gi,) if w is None else (gi, gw)))
    _pedantic(benchmark, run)


def _bench_numpy(benchmark, op, phase, shape):
    x, w, g = _data(op, shape)
    _pedantic(benchmark, _run, registry.get(op).reference, op, phase, x, w, g)


def _bench_torch(benchmark, op, phase, shape):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    torch.set_num_threads(2)
    fn = _torch_fns()[op]
    x, w, g = _data(op, shape)
    gt = torch.from_numpy(g)

    def run():
        if phase == "fwd":
            with torch.no_grad():
                return fn(F, torch.from_numpy(x), None if w is None else torch.from_numpy(w)), ()
        xt = torch.from_numpy(x).requires_grad_()
        wt = None if w is None else torch.from_numpy(w).requires_grad_()
        y = fn(F, xt, wt)
        y.backward(gt)
        return y.detach(), (xt.grad,) if wt is None else (xt.grad, wt.grad)

    y, grads = run()
    if op != "rrelu":  # torch draws its own random slopes
        _check(op, phase, shape, y.numpy(), tuple(t.numpy() for t in grads))
    _pedantic(benchmark, run)


def _bench_copy(benchmark, impl, phase, shape):
    """A copy of nbytes/2 bytes reads nbytes/2 and writes nbytes/2: the same traffic as the op.
    numpy: np.copyto (one thread); torch: Tensor.copy_ on 2 threads (skipped without torch).
    The table divides by the faster of the two."""
    nbytes = _nbytes(shape, phase)
    src = np.random.default_rng(0).standard_normal(nbytes // 2 // ITEMSIZE, dtype=np.float32)
    dst = np.empty_like(src)
    if impl == "numpy":
        copy, args = np.copyto, (dst, src)
    else:
        torch = pytest.importorskip("torch")
        torch.set_num_threads(2)
        copy, args = torch.Tensor.copy_, (torch.from_numpy(dst), torch.from_numpy(src))
    copy(*args)
    np.testing.assert_array_equal(dst, src)
    _pedantic(benchmark, copy, *args)


def _C_module():
    C = pytest.importorskip("pycnn._C")
    if C.num_threads() != 2:
        C.set_num_threads(2)  # like torch.set_num_threads(2)
    return C


def _cpp_impl(op):
    if "default" not in registry.get(op).algorithms("cpp"):
        pytest.skip("the cpp backend is not available")
    return registry.get(op).impls[("cpp", "default")]
