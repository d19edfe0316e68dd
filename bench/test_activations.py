"""Benchmarks of the memory-bound ops (the activations, pooling, maxout, dropout, fancy PCA:
every op whose spec has CPU ``bench`` cases of at most 4 FLOPs a byte): pycnn "cpp" vs its
bare kernel (the elementwise family) vs the NumPy reference vs PyTorch CPU vs a copy of the
same bytes (the memory limit of a map).

    pytest bench/test_activations.py --benchmark-only

The cases, shapes, params, torch forms and byte counts all come from the op specs
(pycnn/ops/*.py: ``bench``, ``torch``, ``bytes`` / ``backward_bytes``), through
pycnn/bench/measure.py; ``pycnn bench`` times the same cases.  Every case checks its result
against the reference before it is timed.
"""
from __future__ import annotations

import numpy as np
import pytest

from bench.conftest import pedantic  # noqa: E402
from pycnn.bench import measure
from pycnn.ops import registry

IMPLS = ["pycnn", "kernel", "numpy", "torch", "copy-numpy", "copy-torch"]


def _memory_bound(op, case):
    flops, nbytes = op.cost("fwd", case.shapes, case.params)
    return flops <= measure.COMPUTE_BOUND * nbytes


CASES = [(op.name, i, phase) for op in registry.all_ops() for i, case in enumerate(op.bench)
         if case.where == "cpu" and _memory_bound(op, case) for phase in case.phases]
# one test per (op, shape, pass, impl), impl varying fastest: the implementations of a case
# run back to back, so that a burst of load on this shared machine hits them alike
BENCH_CASES = [(name, i, phase, impl) for name, i, phase in CASES for impl in IMPLS]


def _id(name, i, phase, impl):
    return f"{name}-{phase}-{'x'.join(map(str, registry.get(name).bench[i].shapes[0]))}-{impl}"


@pytest.mark.parametrize("name, index, phase, impl", BENCH_CASES, ids=[_id(*c) for c in BENCH_CASES])
def test_memory_bound_op(benchmark, record, name, index, phase, impl):
    op = registry.get(name)
    case = op.bench[index]
    inputs, params, grad = measure.case_data(name, index)
    nbytes = measure.cost(op, case, phase, inputs)[1]
    benchmark.group = f"{name} {phase} {case.shapes[0]}"
    if impl.startswith("copy"):
        _bench_copy(benchmark, impl.split("-")[1], nbytes)
    elif impl == "pycnn":
        pycnn_impl = _cpp(op, inputs, params)
        measure.check(op, pycnn_impl, phase, inputs, params, grad)
        pedantic(benchmark, measure.run_impl, pycnn_impl, phase, inputs, params, grad)
    elif impl == "kernel":
        _bench_kernel(benchmark, op, phase, inputs, params, grad)
    elif impl == "numpy":
        pedantic(benchmark, measure.run_impl, op.reference, phase, inputs, params, grad)
    else:
        torch = pytest.importorskip("torch")
        torch.set_num_threads(2)
        run, comparable = measure.torch_runner(torch, op, phase, inputs, params, grad)
        if comparable:
            y, grads = measure.run_impl(op.reference, phase, inputs, params, grad)
            measure.check_torch(op, run, y, tuple(g for g in grads if g is not None))
        pedantic(benchmark, run)
    record((name, phase, case.shapes[0]), impl, nbytes)


def _bench_kernel(benchmark, op, phase, x_inputs, params, grad):
    """The two bare _C calls of an elementwise op into preallocated outputs: no wrapper, no
    allocation (ops outside the elementwise family have no bare form here)."""
    C = _C_module()
    if op.elementwise is None:
        pytest.skip(f"{op.name} is not in the elementwise family")
    (x,) = x_inputs
    values = tuple(kind(params.get(name, default)) for name, default, kind in op.elementwise)
    forward, backward = getattr(C, f"{op.name}_forward"), getattr(C, f"{op.name}_backward")
    y, gx = np.full_like(x, np.nan), np.full_like(x, np.nan)

    def run():
        forward(x, y, *values)
        if phase == "fwd+bwd":
            backward(x, grad, gx, *values)
    run()
    y_ref, grads_ref = measure.run_impl(op.reference, phase, x_inputs, params, grad)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-6)
    if phase == "fwd+bwd":
        np.testing.assert_allclose(gx, grads_ref[0], rtol=2e-5, atol=2e-6)
    pedantic(benchmark, run)


def _bench_copy(benchmark, impl, nbytes):
    """A copy of nbytes/2 bytes reads nbytes/2 and writes nbytes/2: the same traffic as the op.
    numpy: np.copyto (one thread); torch: Tensor.copy_ on 2 threads (skipped without torch).
    The table divides by the faster of the two."""
    torch = None
    if impl == "torch":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(2)
    pedantic(benchmark, measure.copy_runner(nbytes, torch))


def _C_module():
    C = pytest.importorskip("pycnn._C")
    if C.num_threads() != 2:
        C.set_num_threads(2)  # like torch.set_num_threads(2)
    return C


def _cpp(op, inputs, params):
    _C_module()
    impl = measure.cpp_route(op, inputs, params)
    if impl is None:
        pytest.skip("the cpp backend is not available")
    return impl
