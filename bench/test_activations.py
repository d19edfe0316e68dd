"""Activation benchmarks (the rectifiers, sigmoid, tanh, maxout, dropout) and fancy PCA: pycnn
"cpp" vs its bare kernel vs the NumPy reference vs PyTorch CPU vs a copy of the same bytes
(the memory limit of a map).

    pytest bench/test_activations.py --benchmark-only

Every case checks its result against the NumPy reference before it is timed.

The shapes, the torch forms of the ops and the bytes of each pass come from
pycnn/bench/harness.py (``pycnn bench`` prints the same cases), where the byte arithmetic is
written out in ``pass_bytes``: maps 2 * 4N (fwd) and 5 * 4N (fwd+bwd) for N elements of x,
dropout 4 * 4N (fwd+bwd), maxout (k = 2) 6.5N and 13N with its 1-byte winners.
    fancy PCA on uint8 images (forward only): read 1 byte, write 4 (float32) -> 5 * N
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from pycnn.bench import harness as benchmarks
from pycnn.autograd import Context
from pycnn.ops import registry
from bench.conftest import pedantic  # noqa: E402

SHAPES = benchmarks.MAP_SHAPES
PHASES = list(benchmarks.PHASES)
ITEMSIZE = benchmarks.ITEMSIZE
TOL = dict(rtol=2e-5, atol=2e-6)




def _nbytes(shape, phase, op):
    return benchmarks.pass_bytes(op, phase, shape, OPS[op]["params"])


# ------------------------------------------------------------------------------ the ops
# params: the keyword arguments of the registry op; kernel: (C, x, w, g, out, gw, params)
# calls into _C (forward, backward); torch: (F, x, w) -> y.

def _torch_fns():
    """op -> (F, x, w) -> y: the torch forms of pycnn/bench/harness.py with each op's params."""
    return {op: functools.partial(lambda spec, F, x, w: spec.torch_fn(F, x, w, **spec.params), spec)
            for op, spec in benchmarks.MAP_OPS.items()}


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
    "sigmoid": dict(params={},
                    fwd=lambda C, x, w, out, p: C.sigmoid_forward(x, out),
                    bwd=lambda C, x, w, g, gi, gw, p: C.sigmoid_backward(x, g, gi)),
    "tanh": dict(params={},
                 fwd=lambda C, x, w, out, p: C.tanh_forward(x, out),
                 bwd=lambda C, x, w, g, gi, gw, p: C.tanh_backward(x, g, gi)),
    # maxout: out is (y, winner) with y (N, C/2, H, W); w unused
    "maxout": dict(params={"pieces": 2},
                   fwd=lambda C, x, w, out, p: C.maxout_forward(x, out[0], out[1], p["pieces"]),
                   bwd=lambda C, x, w, g, gi, gw, p, out: C.maxout_backward(g, out[1], gi, p["pieces"])),
    "dropout": dict(params={"p": 0.5, "seed": 1, "training": True},
                    fwd=lambda C, x, w, out, p: C.dropout_forward(x, out, p["p"], p["seed"]),
                    bwd=lambda C, x, w, g, gi, gw, p: C.dropout_backward(g, gi, p["p"], p["seed"])),
}
UNCHECKED_TORCH = ("rrelu", "dropout")  # torch draws its own random numbers


def _out_shape(op, shape):
    """The shape of y (and of the upstream gradient)."""
    return (shape[0], shape[1] // 2) + tuple(shape[2:]) if op == "maxout" else shape

CASES = [(op, phase, shape) for op in OPS for phase in PHASES for shape in SHAPES]
IDS = [f"{op}-{phase}-{'x'.join(map(str, shape))}" for op, phase, shape in CASES]


@functools.lru_cache(maxsize=4)
def _data(op, shape):
    """x (N, C, H, W), the prelu weight (C,) (None for the others), an upstream gradient."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    g = rng.standard_normal(_out_shape(op, shape), dtype=np.float32)
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
        _bench_copy(benchmark, impl.split("-")[1], _nbytes(shape, phase, op))
    else:
        {"pycnn": _bench_pycnn, "kernel": _bench_kernel, "numpy": _bench_numpy, "torch": _bench_torch}[impl](
            benchmark, op, phase, shape)
    record((op, phase, shape), impl, _nbytes(shape, phase, op))


def _bench_pycnn(benchmark, op, phase, shape):
    """The registered "cpp" implementation, as autograd calls it (allocation included)."""
    _C_module()
    impl = _cpp_impl(op)
    x, w, g = _data(op, shape)
    _check(op, phase, shape, *_run(impl, op, phase, x, w, g))
    pedantic(benchmark, _run, impl, op, phase, x, w, g)


def _bench_kernel(benchmark, op, phase, shape):
    """The bare _C calls into preallocated outputs: no wrapper, no allocation."""
    C = _C_module()
    x, w, g = _data(op, shape)
    spec, params = OPS[op], OPS[op]["params"]
    y = np.full(_out_shape(op, shape), np.nan, dtype=np.float32)
    out = (y, np.empty(y.shape, np.uint8)) if op == "maxout" else y
    gi = np.full_like(x, np.nan)
    gw = None if w is None else np.full_like(w, np.nan)
    backward_reads_out = op == "maxout"

    def run():
        spec["fwd"](C, x, w, out, params)
        if phase == "fwd+bwd":
            spec["bwd"](C, x, w, g, gi, gw, params, *((out,) if backward_reads_out else ()))

    run()
    _check(op, phase, shape, y, () if phase == "fwd" else ((gi,) if w is None else (gi, gw)))
    pedantic(benchmark, run)


def _bench_numpy(benchmark, op, phase, shape):
    x, w, g = _data(op, shape)
    pedantic(benchmark, _run, registry.get(op).reference, op, phase, x, w, g)


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
    if op not in UNCHECKED_TORCH:
        _check(op, phase, shape, y.numpy(), tuple(t.numpy() for t in grads))
    pedantic(benchmark, run)


def _bench_copy(benchmark, impl, nbytes):
    """A copy of nbytes/2 bytes reads nbytes/2 and writes nbytes/2: the same traffic as the op.
    numpy: np.copyto (one thread); torch: Tensor.copy_ on 2 threads (skipped without torch).
    The table divides by the faster of the two."""
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
    pedantic(benchmark, copy, *args)


def _C_module():
    C = pytest.importorskip("pycnn._C")
    if C.num_threads() != 2:
        C.set_num_threads(2)  # like torch.set_num_threads(2)
    return C


def _cpp_impl(op):
    if "default" not in registry.get(op).algorithms("cpp"):
        pytest.skip("the cpp backend is not available")
    return registry.get(op).impls[("cpp", "default")]


# ------------------------------------------------------------------------------ fancy PCA
# A batch of uint8 RGB images -> float32 on the 0..255 scale (read 1 byte, write 4 per element).

PCA_SHAPE = (256, 3, 32, 32)


@functools.lru_cache(maxsize=1)
def _pca_data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, PCA_SHAPE, dtype=np.uint8)
    eigvals, eigvecs = np.linalg.eigh(np.cov(rng.uniform(0, 1, (3, 100))))
    return images, {"eigvecs": eigvecs, "eigvals": eigvals, "alphas": rng.normal(0, 0.1, (PCA_SHAPE[0], 3))}


@functools.lru_cache(maxsize=1)
def _pca_expected():
    images, params = _pca_data()
    return registry.get("fancy_pca").reference.forward(Context((False,)), images, **params)


@pytest.mark.parametrize("impl", IMPLS)
def test_fancy_pca(benchmark, record, impl):
    benchmark.group = f"fancy_pca fwd {PCA_SHAPE}"
    nbytes = 5 * int(np.prod(PCA_SHAPE))  # uint8 in, float32 out
    images, params = _pca_data()
    tol = dict(rtol=1e-6, atol=1e-4)
    if impl.startswith("copy"):
        _bench_copy(benchmark, impl.split("-")[1], nbytes)
    elif impl == "pycnn":
        _C_module()
        cpp = _cpp_impl("fancy_pca")

        def run():
            return cpp.forward(Context((False,)), images, **params)
        np.testing.assert_allclose(run(), _pca_expected(), **tol)
        pedantic(benchmark, run)
    elif impl == "kernel":
        C = _C_module()
        out = np.full(PCA_SHAPE, np.nan, np.float32)
        args = (images, params["eigvecs"], params["eigvals"], params["alphas"], 255.0, out)
        C.fancy_pca_apply(*args)
        np.testing.assert_allclose(out, _pca_expected(), **tol)
        pedantic(benchmark, C.fancy_pca_apply, *args)
    elif impl == "numpy":
        reference = registry.get("fancy_pca").reference
        pedantic(benchmark, lambda: reference.forward(Context((False,)), images, **params))
    else:  # torch: uint8 + float32 offsets promote to float32 in one kernel
        torch = pytest.importorskip("torch")
        torch.set_num_threads(2)
        delta = (params["alphas"] * params["eigvals"]) @ params["eigvecs"].T * 255.0
        xt = torch.from_numpy(images)

        def run():
            dt = torch.from_numpy(delta.astype(np.float32))[:, :, None, None]
            return xt + dt
        np.testing.assert_allclose(run().numpy(), _pca_expected(), **tol)
        pedantic(benchmark, run)
    record(("fancy_pca", "fwd", PCA_SHAPE), impl, nbytes)
