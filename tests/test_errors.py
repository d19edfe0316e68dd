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
