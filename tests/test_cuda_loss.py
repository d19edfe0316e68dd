"""softmax_cross_entropy's own cuda kernel (kernels/loss.py) against the reference: outputs
NaN-filled, float32 and float64, smoothing and class weights, odd shapes, more rows than a
block has threads, non-contiguous logits and labels of any integer dtype; labels checked on
the device (no host synchronisation) and reported once, by name, where the host reads data.
"""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import device
from pycnn.autograd import Context
from pycnn.ops import _util, registry
from tests.test_cuda_backend import (
    DTYPES,
    check_against_reference,
    cuda_backend,
    needs_cuda,
    real_gpu_only,
    run_op,
    to_device,
    to_host,
)

pytestmark = pytest.mark.filterwarnings("ignore:Grid size")
OP = "softmax_cross_entropy"


def _kernel():
    cuda_backend()
    return registry.get(OP).impls[("cuda", "kernel")]


@needs_cuda
def test_the_kernel_is_the_cuda_auto_choice():
    cuda_backend()
    assert registry.get(OP).algorithms("cuda") == ["kernel", "reference"]
    logits = to_device(np.zeros((2, 3), np.float32))
    with pycnn.use_backend("cuda"):
        assert registry.get(OP).resolve((logits,), {"labels": to_device(np.array([0, 2]))})[1] == "kernel"


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_spec_samples_match_the_reference(dtype):
    op = registry.get(OP)
    rng = np.random.default_rng(31)
    for sample in op.samples(rng, np.dtype(dtype)):
        check_against_reference(op, sample, dtype, rng, algo="kernel")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_many_rows_odd_classes_strided_arrays(dtype, label_dtype):
    """37 rows (more than a block's threads in the simulator, so threads take several rows),
    7 classes, logits far from zero (the log-sum-exp shift), a transposed view of logits,
    every other element of a labels array, an incoming gradient other than 1."""
    rng = np.random.default_rng(32)
    logits_t = (50 + 4 * rng.standard_normal((7, 37))).astype(dtype)
    labels = np.repeat(rng.integers(0, 7, 37), 2).astype(label_dtype)
    weight = rng.uniform(0.2, 2.0, 7).astype(dtype)
    op = registry.get(OP)
    for params in ({}, {"label_smoothing": 0.15, "class_weight": weight}):
        ctx = Context((True,))
        ref = op.reference.forward(ctx, logits_t.T, labels=labels[::2], **params)
        grad = np.asarray(0.37, dtype)
        (ref_grad,) = op.reference.backward(ctx, grad)
        device_params = {key: to_device(value) for key, value in params.items()}
        logits = to_device(logits_t).T                     # (37, 7), not C-contiguous
        with pycnn.use_backend("cuda"):
            _, algo, impl = op.resolve((logits,), {"labels": to_device(labels)[::2], **device_params})
        assert algo == "kernel"
        y, (g,) = run_op(impl, (logits,), {"labels": to_device(labels)[::2], **device_params}, to_device(grad))
        tol = dict(rtol=2e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(y, ref, **tol)
        np.testing.assert_allclose(g, ref_grad, **tol)


@needs_cuda
def test_one_launch_each_way():
    from pycnn.kernels import _launch
    impl = _kernel()
    logits = to_device(np.random.default_rng(33).standard_normal((5, 4)))
    ctx = Context((True,))
    before = _launch.launch_count()
    loss = impl.forward(ctx, logits, labels=to_device(np.array([0, 1, 2, 3, 0])))
    assert _launch.launch_count() - before == 1
    impl.backward(ctx, to_device(np.ones((), loss.dtype)))
    assert _launch.launch_count() - before == 2
    device.to_host(loss)


@needs_cuda
@pytest.mark.parametrize("bad", [7, -1])
def test_bad_labels_found_on_the_device_are_reported_once_by_name(bad):
    """The kernel itself (the shared argument check, which reads host labels, is bypassed):
    the loss and the bad row's gradient are NaN, and the first host read raises one
    ValueError naming labels, the value and the row; the next read does not."""
    impl = _kernel()
    rng = np.random.default_rng(34)
    logits = to_device(rng.standard_normal((6, 4)).astype(np.float32))
    labels = to_device(np.array([0, 1, bad, 2, 3, 1]))
    ctx = Context((True,))
    with _util.nan_filled_outputs():
        loss = impl.forward(ctx, logits, labels=labels)
        (grad,) = impl.backward(ctx, to_device(np.ones((), np.float32)))
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 4\), got {bad} at row 2"):
        device.to_host(loss)
    assert np.isnan(device.to_host(loss))  # reported once: this read passes
    grad = to_host(grad)
    assert np.isnan(grad[2]).all() and np.isfinite(np.delete(grad, 2, axis=0)).all()
    # a good call afterwards is not blamed for the old one
    good = impl.forward(Context((True,)), logits, labels=to_device(np.array([0, 1, 2, 2, 3, 1])))
    assert np.isfinite(device.to_host(good))


@needs_cuda
def test_the_shared_check_does_not_read_labels_on_a_gpu(monkeypatch):
    """The argument check leaves the range of CUDA labels to the kernel (reading them would
    synchronise with the host every step); host labels are still checked there."""
    from pycnn.ops import loss as spec
    read = []
    monkeypatch.setattr(spec, "check_label_range", lambda labels, classes: read.append(classes))
    monkeypatch.setattr(spec, "is_cuda_array", lambda a: True)
    spec._check_softmax_ce(np.zeros((2, 3), np.float32), np.array([0, 5]))
    assert read == []
    monkeypatch.setattr(spec, "is_cuda_array", lambda a: False)
    spec._check_softmax_ce(np.zeros((2, 3), np.float32), np.array([0, 5]))
    assert read == [3]


@needs_cuda
def test_bad_labels_through_the_api():
    """F.softmax_cross_entropy with bad labels: one ValueError naming labels, at the latest
    when the loss is read (on a GPU: found by the kernel; in the simulator, host labels:
    by the shared check before the call)."""
    logits = pycnn.Tensor(to_device(np.zeros((3, 4), np.float32)), requires_grad=True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        with pycnn.use_backend("cuda"):
            loss = F.softmax_cross_entropy(logits, to_device(np.array([0, 4, 1])))
        loss.backward()
        loss.item()


@pytest.mark.gpu
@real_gpu_only
def test_gpu_bad_labels_raise_at_item_without_a_sync_before():
    import cupy
    logits = pycnn.Tensor(cupy.zeros((3, 4), cupy.float32), requires_grad=True)
    with pycnn.use_backend("cuda"):
        loss = F.softmax_cross_entropy(logits, cupy.asarray([0, 9, 1]))  # no error yet: nothing was read
    loss.backward()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got 9 at row 1"):
        loss.item()
