"""batchnorm_act on the cuda backend: the fused kernels ('fused', the auto choice) and the
chain of the batchnorm and activation kernels ('chain') against the reference, outputs
NaN-filled, float32 and float64, odd shapes, several blocks per channel, non-contiguous
inputs; and the launches each pass costs.  Runs in numba's CUDA simulator or on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
from pycnn.autograd import Context
from pycnn.ops import registry
from tests.test_cuda_backend import (
    DTYPES,
    check_against_reference,
    cuda_backend,
    kernel_module,
    needs_cuda,
    run_op,
    to_device,
    to_host,
)

pytestmark = pytest.mark.filterwarnings("ignore:Grid size")
OP = "batchnorm_act"


def _sample(rng, dtype, shape, activation, training=True, running=True, **params):
    c = shape[1]
    x = (2 * rng.standard_normal(shape) + 1).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    pw = rng.uniform(-0.4, 0.6, c).astype(dtype) if activation == "prelu" else None
    params = dict(params, training=training, activation=activation)
    if running:
        params.update(running_mean=rng.standard_normal(c).astype(dtype),
                      running_var=rng.uniform(0.5, 2, c).astype(dtype))
    return registry.Sample((x, gamma, beta, pw), params)


@needs_cuda
def test_fused_is_the_cuda_auto_choice_and_chain_stays_reachable():
    cuda_backend()
    assert registry.get(OP).algorithms("cuda") == ["fused", "chain"]
    x = to_device(np.ones((2, 3, 2, 2), np.float32))
    with pycnn.use_backend("cuda"):
        assert registry.get(OP).resolve((x,), {"activation": "relu"})[1] == "fused"
        assert registry.get(OP).resolve((x,), {"activation": "relu"}, "chain")[1] == "chain"


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algo", ["fused", "chain"])
def test_every_spec_sample_matches_the_reference(algo, dtype):
    """The spec's samples: relu, leaky_relu (a negative slope), prelu, elu, swish; training
    with and without running statistics, evaluation."""
    op = registry.get(OP)
    rng = np.random.default_rng(21)
    with pycnn.use_backend("cuda"):  # chain routes its steps when it runs (in the simulator: on host arrays)
        for sample in op.samples(rng, np.dtype(dtype)):
            check_against_reference(op, sample, dtype, rng, algo=algo)


@needs_cuda
@pytest.mark.parametrize("activation, params", [("relu", {}), ("leaky_relu", {"slope": 0.2}), ("prelu", {}),
                                                ("elu", {"alpha": 1.3}), ("swish", {})])
def test_odd_shapes_and_several_blocks_per_channel(activation, params, monkeypatch):
    """Odd sizes (2-D and 4-D), and one value per thread so that each channel's statistics and
    gradient sums are merged over several blocks (a fixed order: no atomics)."""
    bn = kernel_module("batchnorm")
    monkeypatch.setattr(bn, "ELEMENTS_PER_THREAD", 1)
    rng = np.random.default_rng(22)
    op = registry.get(OP)
    for shape, dtype in (((3, 5, 3, 7), np.float64), ((37, 3), np.float32)):
        assert bn._split(np.empty(shape))[3] > 1
        check_against_reference(op, _sample(rng, dtype, shape, activation, **params), dtype, rng, algo="fused")
        # the last-block tickets are back to zero for the next launch
        assert not to_host(next(iter(bn._tickets.values()))).any()
    check_against_reference(op, _sample(rng, np.float64, (2, 3, 3, 3), activation, training=False, **params),
                            np.float64, rng, algo="fused")


@needs_cuda
def test_several_blocks_give_the_same_bits_every_time(monkeypatch):
    """Whichever block finishes last, it merges the partials in one fixed order."""
    monkeypatch.setattr(kernel_module("batchnorm"), "ELEMENTS_PER_THREAD", 1)
    rng = np.random.default_rng(27)
    sample = _sample(rng, np.float32, (3, 2, 5, 5), "elu", alpha=0.5)
    inputs = tuple(to_device(a) for a in sample.inputs)
    grad = to_device(rng.standard_normal((3, 2, 5, 5)).astype(np.float32))
    with pycnn.use_backend("cuda"):
        _, _, impl = registry.get(OP).resolve(inputs, sample.params, "fused")
    runs = [run_op(impl, inputs, {**sample.params, "running_mean": None, "running_var": None}, grad) for _ in range(3)]
    for y, grads in runs[1:]:
        np.testing.assert_array_equal(y, runs[0][0])
        for g, first in zip(grads[:3], runs[0][1][:3]):
            np.testing.assert_array_equal(g, first)


@needs_cuda
@pytest.mark.parametrize("needs", [(True, False, False, True), (False, True, True, False), (False, False, False, True)])
def test_only_the_gradients_asked_for(needs):
    rng = np.random.default_rng(23)
    check_against_reference(registry.get(OP), _sample(rng, np.float64, (2, 3, 4, 3), "prelu"), np.float64, rng,
                            needs=needs, algo="fused")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_non_contiguous_inputs_and_running_statistics(dtype):
    """x a strided view, gamma / beta / prelu_weight / the running statistics every other
    element of a longer array: results as on contiguous copies, running statistics updated
    in place in the given (strided) arrays."""
    rng = np.random.default_rng(24)
    op = registry.get(OP)
    base = (2 * rng.standard_normal((3, 4, 5, 12)) + 1).astype(dtype)
    x = base[:, :, :, ::3]                                           # (3, 4, 5, 4), strided
    long = lambda lo, hi: rng.uniform(lo, hi, 8).astype(dtype)[::2]  # noqa: E731 - (4,), stride 2
    gamma, beta, pw, rm, rv = long(0.5, 1.5), long(-1, 1), long(-0.4, 0.6), long(-1, 1), long(0.5, 2)
    params = {"activation": "prelu", "running_mean": rm.copy(), "running_var": rv.copy()}
    ctx = Context((True,) * 4)
    ref_y = op.reference.forward(ctx, x, gamma, beta, pw, **params)
    grad = rng.standard_normal(ref_y.shape).astype(dtype)
    ref_grads = op.reference.backward(ctx, grad)
    # strided device views (the copies above are contiguous): every other element of a longer array
    rm_view, rv_view = (to_device(np.repeat(a, 2))[::2] for a in (rm, rv))
    dev = dict(activation="prelu", running_mean=rm_view, running_var=rv_view)
    inputs = tuple(to_device(a) for a in (base, gamma, beta, pw))
    inputs = (inputs[0][:, :, :, ::3],) + inputs[1:]
    with pycnn.use_backend("cuda"):
        _, algo, impl = op.resolve(inputs, dev)
    assert algo == "fused" and not inputs[0].flags.c_contiguous
    y, grads = run_op(impl, inputs, dev, to_device(grad))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ref_y, **tol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, **tol)
    np.testing.assert_allclose(to_host(rm_view), params["running_mean"], **tol)
    np.testing.assert_allclose(to_host(rv_view), params["running_var"], **tol)


@needs_cuda
@pytest.mark.parametrize("algo, expected", [("fused", (2, 2)), ("chain", (3, 3))])
def test_launches_per_pass(algo, expected):
    """fused: the statistics (their last blocks merge the partials) + the
    normalise-and-activate pass; backward: the reduction with the activation's gradient
    folded in (its last blocks add the partials) + grad_x.  chain: one more each way (the
    activation's own kernel)."""
    from pycnn.kernels import _launch
    rng = np.random.default_rng(25)
    sample = _sample(rng, np.float32, (2, 3, 4, 4), "relu")
    inputs = tuple(to_device(a) for a in sample.inputs)
    with pycnn.use_backend("cuda"):
        _, _, impl = registry.get(OP).resolve(inputs, sample.params, algo)
        ctx = Context((True, True, True, False))
        before = _launch.launch_count()
        y = impl.forward(ctx, *inputs, **sample.params)
        forward = _launch.launch_count() - before
        impl.backward(ctx, to_device(np.ones(y.shape, np.float32)))
    assert (forward, _launch.launch_count() - before - forward) == expected
