"""Shared helpers of the test suite: running one implementation of a registry op, and the
float64 finite-difference gradient check."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

from pycnn.autograd import Context
from pycnn.device import cpp_extension

TOLERANCE = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12)}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a real CUDA device")


def fresh(sample):
    """A deep copy of a sample, so that in-place updates (running statistics) don't leak."""
    return copy.deepcopy(sample)


def run_forward_backward(impl, sample, grad_output_seed=0):
    """Forward then backward of ``impl`` on ``sample``; returns (output, input gradients,
    the upstream gradient used).  The upstream gradient is random, so every element counts."""
    needs = tuple(x is not None and d for x, d in zip(sample.inputs, sample.differentiable))
    ctx = Context(needs)
    output = np.array(impl.forward(ctx, *sample.inputs, **sample.params), copy=True)
    grad_output = np.random.default_rng(grad_output_seed).standard_normal(output.shape).astype(output.dtype)
    grads = impl.backward(ctx, grad_output)
    return output, tuple(None if g is None else np.array(g, copy=True) for g in grads), grad_output


def numerical_gradients(impl, sample, grad_output, eps=1e-6):
    """Central differences of sum(grad_output * f(inputs)) for every differentiable input."""
    def objective():
        s = fresh(sample)
        ctx = Context(tuple(False for _ in s.inputs))
        return float((grad_output * impl.forward(ctx, *s.inputs, **s.params)).sum())

    grads = []
    for x, differentiable in zip(sample.inputs, sample.differentiable):
        if x is None or not differentiable:
            grads.append(None)
            continue
        numeric = np.zeros(x.shape)
        flat, out = x.reshape(-1), numeric.reshape(-1)
        for j in range(x.size):
            original = flat[j]
            flat[j] = original + eps
            plus = objective()
            flat[j] = original - eps
            minus = objective()
            flat[j] = original
            out[j] = (plus - minus) / (2 * eps)
        grads.append(numeric)
    return grads


@contextlib.contextmanager
def omp_threads(n: int):
    """Run the C++ kernels called inside the block on ``n`` OpenMP threads."""
    from pycnn import _C

    before = _C.num_threads()
    _C.set_num_threads(n)
    try:
        yield
    finally:
        _C.set_num_threads(before)


@pytest.fixture
def one_kernel_thread():
    """Small shapes on a shared machine: one OpenMP thread for pycnn's kernels, so the many
    small calls (gradcheck) don't wait on a second thread."""
    if cpp_extension() is None:
        yield
        return
    with omp_threads(1):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
