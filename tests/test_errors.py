"""Bad input raises a clear ValueError / TypeError naming the argument."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn.functional as F
from pycnn import Tensor

f32 = np.float32


def z(*shape, dtype=f32):
    return np.zeros(shape, dtype)


CASES = [
    # (call, exception, words the message must contain)
    (lambda: F.conv3x3(z(2, 3, 4), z(4, 3, 3, 3)), ValueError, "x must have 4 dimensions"),
    (lambda: F.conv3x3(z(2, 3, 4, 4), z(4, 2, 3, 3)), ValueError, "input channels"),
    (lambda: F.conv3x3(z(2, 3, 4, 4), z(4, 3, 5, 5)), ValueError, "(K, C, 3, 3)"),
    (lambda: F.conv3x3(z(2, 3, 4, 4), z(4, 3, 3, 3), z(5)), ValueError, "bias must have shape (4,)"),
    (lambda: F.conv3x3(z(2, 3, 4, 4), z(4, 3, 3, 3, dtype=np.float64)), TypeError, "one dtype"),
    (lambda: F.conv3x3(z(2, 3, 4, 4, dtype=np.int32), z(4, 3, 3, 3)), TypeError, "x must be float32 or float64"),
    (lambda: F.conv3x3(z(2, 3, 4, 4), z(4, 3, 3, 3), algo="fft"), ValueError, "algo 'fft'"),
    (lambda: F.max_pool2x2(z(2, 3, 1, 4)), ValueError, "at least 2x2"),
    (lambda: F.avg_pool2x2(z(3, 4, 4)), ValueError, "x must have 4 dimensions"),
    (lambda: F.leaky_relu(z(3), slope="a"), TypeError, "slope must be a number"),
    (lambda: F.leaky_relu(z(3), slope=float("nan")), ValueError, "slope must be finite"),
    (lambda: F.prelu(z(2, 3, 4, 4), z(4)), ValueError, "one slope per channel"),
    (lambda: F.prelu(z(5), z(5)), ValueError, "x must have"),
    (lambda: F.rrelu(z(3), lower=8.0, upper=3.0), ValueError, "upper must be >= lower"),
    (lambda: F.rrelu(z(3), lower=-1.0), ValueError, "lower must be"),
    (lambda: F.rrelu(z(3), training=True, seed=-1), ValueError, "seed must be in"),
    (lambda: F.rrelu(z(3), training=True, seed=1.5), TypeError, "seed must be an integer"),
    (lambda: F.elu(z(3), alpha=None), TypeError, "alpha must be a number"),
    (lambda: F.maxout(z(2, 5, 3, 3), pieces=2), ValueError, "divisible by pieces=2"),
    (lambda: F.maxout(z(2, 4), pieces=0), ValueError, "pieces must be a positive integer"),
    (lambda: F.linear(z(2, 3), z(4, 5)), ValueError, "input features"),
    (lambda: F.linear(z(2, 3, 1), z(4, 3)), ValueError, "x must have 2 dimensions"),
    (lambda: F.softmax_cross_entropy(z(3, 4), np.array([0, 1, 4])), ValueError, "labels must lie in [0, 4)"),
    (lambda: F.softmax_cross_entropy(z(3, 4), np.array([0.0, 1, 2])), TypeError, "labels must be an integer"),
    (lambda: F.softmax_cross_entropy(z(3, 4), np.array([0, 1])), ValueError, "labels must have shape (3,)"),
    (lambda: F.softmax_cross_entropy(z(3, 4), np.array([0, 1, 2]), label_smoothing=1.0), ValueError,
     "label_smoothing"),
    (lambda: F.batch_norm(z(2, 3, 4, 4), z(4), z(3)), ValueError, "gamma must have shape (3,)"),
    (lambda: F.batch_norm(z(2, 3, 4, 4), z(3), z(3), training=False), ValueError, "running_mean"),
    (lambda: F.batch_norm(z(1, 3), z(3), z(3)), ValueError, "more than one value per channel"),
    (lambda: F.batch_norm(z(2, 3, 4), z(3), z(3)), ValueError, "x must have 2 or 4 dimensions"),
    (lambda: F.dropout(z(3), p=1.5), ValueError, "p must be a probability"),
    (lambda: Tensor(z(2, 3)) + Tensor(z(4, 3)), ValueError, "cannot be broadcast"),
    (lambda: Tensor(z(2, 3)) + Tensor(z(2, 3, dtype=np.float64)), TypeError, "one dtype"),
    (lambda: Tensor(z(2, 3)) + "a", TypeError, "operand must be"),
    (lambda: Tensor(z(2, 3)).reshape(4, 2), ValueError, "does not fit"),
    (lambda: Tensor(z(2, 3)).sum(axis=2), ValueError, "axis 2 is out of range"),
    (lambda: Tensor(z(2, 3)) @ Tensor(z(2, 3)), ValueError, "inner dimensions"),
]


@pytest.mark.parametrize("call,exception,words", CASES, ids=[c[2] for c in CASES])
def test_bad_input_is_named(call, exception, words):
    with pytest.raises(exception) as info:
        call()
    assert words in str(info.value)


def test_non_contiguous_input_is_handled():
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(f32)
    view = x[:, ::2, :, ::-1]
    expected = np.maximum(np.ascontiguousarray(view), 0)
    np.testing.assert_allclose(F.relu(view).data, expected)
    np.testing.assert_allclose(F.max_pool2x2(view).data, F.max_pool2x2(np.ascontiguousarray(view)).data)


# ------------------------------------------- found by an independent sweep (fifth session)

def test_numpy_scalars_are_numbers_like_pythons():
    """np.float32(-3) through an op, Tensor * np.float64(2), a NumPy lr: as Python numbers
    (the scalar takes the Tensor's dtype; alone, a NumPy float keeps its own)."""
    from pycnn import nn, optim
    y = F.relu(np.float32(-3))
    assert y.numpy().dtype == np.float32 and float(y.numpy()) == 0.0
    assert F.elu(np.float64(-1)).numpy().dtype == np.float64
    t = Tensor(np.ones(3, f32), requires_grad=True)
    for scalar in (np.float64(2), np.int64(2)):
        product = t * scalar
        assert product.numpy().dtype == np.float32 and np.all(product.numpy() == 2)
    product.sum().backward()
    assert t.grad.dtype == np.float32
    with pytest.raises(TypeError, match="operand must be"):
        F.relu(np.bool_(True))
    sgd = optim.SGD(nn.Linear(3, 2).parameters(), lr=np.float32(0.1))
    assert isinstance(sgd.param_groups[0]["lr"], float)


def test_class_weight_of_another_dtype_takes_the_logits_dtype():
    """A float64 class_weight with float32 logits made the loss and the logits' gradient
    float64 (every other op refuses mixed dtypes; a weight is a setting, so it is cast)."""
    logits = Tensor(np.random.default_rng(0).standard_normal((4, 3)).astype(f32), requires_grad=True)
    loss = F.softmax_cross_entropy(logits, np.array([0, 1, 2, 0]), class_weight=np.array([1.0, 2.0, 0.5]))
    loss.backward()
    assert loss.numpy().dtype == np.float32 and logits.grad.dtype == np.float32
    expected = F.softmax_cross_entropy(logits.data, np.array([0, 1, 2, 0]), class_weight=np.array([1, 2, 0.5], f32))
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-6)


MORE_CASES = [
    (lambda: __import__("pycnn").nn.Conv3x3(3, 4, dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (lambda: __import__("pycnn").nn.BatchNorm(3, dtype="float16"), TypeError, "dtype must be float32 or float64"),
    (lambda: __import__("pycnn").nn.Linear(3, 2, dtype="bogus"), TypeError, "dtype must be float32 or float64"),
    (lambda: __import__("pycnn").nn.Dropout("a"), ValueError, "p must be a probability in [0, 1], got 'a'"),
    (lambda: F.rrelu(z(3), training="yes"), TypeError, "training must be True or False"),
    (lambda: F.dropout(z(3), training=1), TypeError, "training must be True or False"),
    (lambda: F.softmax_cross_entropy(z(2, 3), np.array([0, 1]), label_smoothing="x"), ValueError,
     "label_smoothing must be in [0, 1)"),
    (lambda: __import__("pycnn").optim.Adam(__import__("pycnn").nn.Linear(3, 2).parameters(), eps=np.inf),
     ValueError, "eps must be a finite number > 0"),
    (lambda: F.batch_norm(z(4, 3), np.ones(3, f32), z(3), _read_only(3),
                          np.ones(3, f32)), ValueError, "running_mean must be a writable array"),
]


def _read_only(n):
    a = np.zeros(n, f32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("call, exception, words", MORE_CASES)
def test_more_bad_arguments_are_named(call, exception, words):
    with pytest.raises(exception) as info:
        call()
    assert words in str(info.value)


def test_an_empty_weight_initialises_to_an_empty_array():
    from pycnn import initializers
    assert initializers.initialise("he", (3, 0)).shape == (3, 0)


def test_whitening_with_epsilon_zero_refuses_a_singular_covariance():
    """epsilon=0 on 10 images of 48 values divided by zero eigenvalues (NaN and inf out with
    only a RuntimeWarning); now one line says why and what to do.  Full rank still works."""
    from pycnn.data.preprocess import PCAWhiten, ZCAWhiten
    rng = np.random.default_rng(0)
    few = rng.integers(0, 256, (10, 3, 4, 4)).astype(np.uint8)
    many = rng.integers(0, 256, (200, 3, 4, 4)).astype(np.uint8)
    for whiten in (PCAWhiten, ZCAWhiten):
        with pytest.raises(ValueError, match="epsilon=0 needs a full-rank covariance"):
            whiten(epsilon=0).fit(few)
        assert np.isfinite(whiten(epsilon=0).fit(many)(many[:4])).all()
    assert np.isfinite(PCAWhiten(epsilon=0, n_components=5).fit(few)(few)).all()


def test_reduce_on_plateau_ignores_a_nan_metric_never_raises_the_rate_and_checks_its_settings():
    from pycnn import nn, optim, schedules
    params = list(nn.Linear(3, 2).parameters())
    sgd = optim.SGD(params, lr=0.1)
    plateau = schedules.ReduceOnPlateau(sgd, mode="min", patience=1)
    for metric in (float("nan"), 1.0, 0.5, 0.25, 0.1):  # a NaN first epoch was kept as the best
        plateau.step_epoch(metric)
    assert sgd.param_groups[0]["lr"] == 0.1
    sgd = optim.SGD(params, lr=1e-6)
    plateau = schedules.ReduceOnPlateau(sgd, mode="min", patience=0, min_lr=1e-5)
    for metric in (1.0, 1.0, 1.0):  # min_lr above the rate: a "reduction" raised it to 1e-5
        plateau.step_epoch(metric)
    assert sgd.param_groups[0]["lr"] == 1e-6
    for bad, words in ((dict(factor=float("nan")), "factor"), (dict(patience=float("nan")), "patience"),
                       (dict(min_lr=-1.0), "min_lr"), (dict(threshold=float("inf")), "threshold")):
        with pytest.raises(ValueError, match=words):
            schedules.ReduceOnPlateau(sgd, **bad)
