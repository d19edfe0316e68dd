"""Registry-driven op tests: declaring an op adds it to every test here.

* each reference backward passes a float64 finite-difference gradient check;
* each CPU backend implementation matches the reference forward and backward, with its
  outputs pre-filled with NaN so an element it forgot to write is caught;
* each op matches PyTorch where torch is installed (the ``torch`` field of its spec);
* each op states its FLOP and byte counts, forward and backward.
"""
from __future__ import annotations

import numpy as np
import pytest

from pycnn.ops import _util, registry
from tests.conftest import TOLERANCE, fresh, numerical_gradients, run_forward_backward

SAMPLE_SEED = 2024
def samples(op, dtype):
    return op.samples(np.random.default_rng(SAMPLE_SEED), np.dtype(dtype))


def op_sample_cases(where=lambda sample: True):
    for op in registry.all_ops():
        for i, sample in enumerate(samples(op, np.float64)):
            if where(sample):
                yield pytest.param(op.name, i, id=f"{op.name}-{i}")


def backend_cases():
    for op in registry.all_ops():
        for backend in ("cpp",):  # the CUDA backend has its own file: tests/test_cuda_backend.py
            for algo in op.algorithms(backend):
                if algo == "reference":
                    continue  # a portable op: the reference itself
                for dtype in ("float32", "float64"):
                    yield pytest.param(op.name, backend, algo, dtype, id=f"{op.name}-{backend}-{algo}-{dtype}")


@pytest.mark.parametrize("name,index", list(op_sample_cases(lambda sample: sample.gradcheck)))
def test_reference_backward_matches_finite_differences(name, index):
    op = registry.get(name)
    sample = samples(op, np.float64)[index]
    op.check(*sample.inputs, **sample.params)
    _, analytic, grad_output = run_forward_backward(op.reference, fresh(sample))
    numeric = numerical_gradients(op.reference, sample, grad_output)
    for position, (a, n) in enumerate(zip(analytic, numeric)):
        if n is None:
            continue
        assert a is not None, f"{name}: backward gave no gradient for input {position}"
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-7, err_msg=f"{name}: gradient of input {position}")


@pytest.mark.parametrize("name,backend,algo,dtype", list(backend_cases()))
def test_backend_matches_reference(name, backend, algo, dtype):
    op = registry.get(name)
    impl = op.impls[(backend, algo)]
    tolerance = TOLERANCE[np.dtype(dtype)]
    if np.dtype(dtype) == np.float32:  # an algorithm that rounds more says so (Impl.rounding)
        tolerance = {key: value * impl.rounding for key, value in tolerance.items()}
    for index, sample in enumerate(samples(op, dtype)):
        expected_out, expected_grads, _ = run_forward_backward(op.reference, fresh(sample))
        with _util.nan_filled_outputs():
            out, grads, _ = run_forward_backward(impl, fresh(sample))
        assert out.dtype == expected_out.dtype, f"{name}[{index}]: output dtype"
        np.testing.assert_allclose(out, expected_out, **tolerance, err_msg=f"{name}[{index}] forward")
        for position, (g, e) in enumerate(zip(grads, expected_grads)):
            if e is None:
                continue
            assert g is not None, f"{name}[{index}]: no gradient for input {position}"
            np.testing.assert_allclose(g, e, **tolerance, err_msg=f"{name}[{index}] gradient {position}")


@pytest.mark.parametrize("name,index", list(op_sample_cases(lambda sample: sample.torch_agrees)))
def test_matches_pytorch(name, index):
    torch = pytest.importorskip("torch")

    op = registry.get(name)
    sample = samples(op, np.float64)[index]
    expected_out, expected_grads, grad_output = run_forward_backward(op.reference, fresh(sample))

    torch_sample = fresh(sample)
    tensors = [None if x is None else torch.tensor(x, requires_grad=bool(d))
               for x, d in zip(torch_sample.inputs, torch_sample.differentiable)]
    out = op.torch(*tensors, **torch_sample.params)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(out.detach().numpy(), expected_out, rtol=1e-9, atol=1e-11, err_msg="forward")
    for position, (t, e) in enumerate(zip(tensors, expected_grads)):
        if e is not None:
            np.testing.assert_allclose(t.grad.numpy(), e, rtol=1e-9, atol=1e-11, err_msg=f"gradient {position}")
    if name == "batchnorm" and sample.params.get("running_mean") is not None:
        ours = fresh(sample)
        run_forward_backward(op.reference, ours)
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(torch_sample.params[key], ours.params[key], rtol=1e-12, err_msg=key)


def test_every_op_has_a_pytorch_equivalent():
    assert all(callable(op.torch) for op in registry.all_ops())


@pytest.mark.parametrize("name,index", list(op_sample_cases()))
def test_costs_are_counted(name, index):
    op = registry.get(name)
    sample = samples(op, np.float32)[index]
    shapes = [None if x is None else tuple(x.shape) for x in sample.inputs]
    for phase in ("fwd", "bwd", "fwd+bwd"):
        flops, nbytes = op.cost(phase, shapes, sample.params)
        assert isinstance(flops, int) and flops >= 0, phase
        assert isinstance(nbytes, int) and nbytes >= 0, phase
    fwd, bwd, both = (op.cost(phase, shapes, sample.params) for phase in ("fwd", "bwd", "fwd+bwd"))
    assert both == (fwd[0] + bwd[0], fwd[1] + bwd[1])
    if op.flops(*shapes, **sample.params) > 0:  # not a reshape
        assert fwd[1] > 0


@pytest.mark.parametrize("name,index", list(op_sample_cases()))
def test_float32_reference_keeps_dtype(name, index):
    op = registry.get(name)
    sample = samples(op, np.float32)[index]
    out, grads, _ = run_forward_backward(op.reference, fresh(sample))
    assert out.dtype == np.float32, f"{name}: forward gave {out.dtype}"
    for g in grads:
        assert g is None or g.dtype == np.float32, f"{name}: backward gave {g.dtype}"
