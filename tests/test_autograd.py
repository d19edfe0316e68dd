"""The autograd layer: graph building, accumulation, no_grad, dtypes, custom Functions."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import Function, Tensor


def test_default_dtype_is_float32_and_float64_is_kept():
    assert Tensor([1, 2, 3]).dtype == np.float32
    assert Tensor(np.arange(3)).dtype == np.float32
    assert Tensor(np.zeros(3, np.float64)).dtype == np.float64
    assert Tensor(np.zeros(3, np.float64), dtype="float32").dtype == np.float32


def test_bad_data_and_dtype_are_rejected():
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        Tensor([1.0], dtype="int32")
    with pytest.raises(TypeError, match="numeric"):
        Tensor(np.array(["a"]))


def test_chain_rule_through_shared_subexpression():
    # f(a, b) = sum((a*b + a) * a): a is used three times (a diamond in the graph)
    a_np = np.array([1.5, -2.0, 0.5])
    b_np = np.array([0.3, 0.7, -1.1])
    a, b = Tensor(a_np, requires_grad=True), Tensor(b_np, requires_grad=True)
    ((a * b + a) * a).sum().backward()
    np.testing.assert_allclose(a.grad, 2 * a_np * b_np + 2 * a_np)
    np.testing.assert_allclose(b.grad, a_np ** 2)


def test_gradients_accumulate_across_backward_calls_and_zero_grad_resets():
    w = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    (w * w).sum().backward()
    (w * 3.0).sum().backward()
    np.testing.assert_allclose(w.grad, 2 * np.array([2.0, 3.0]) + 3)
    w.zero_grad()
    assert w.grad is None


def test_no_grad_records_nothing():
    w = Tensor(np.ones(3), requires_grad=True)
    with pycnn.no_grad():
        y = (w * 2).sum()
    assert not y.requires_grad and y.is_leaf
    assert pycnn.is_grad_enabled()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_backward_needs_scalar_or_matching_grad():
    w = Tensor(np.ones((2, 2)), requires_grad=True)
    y = w * 2
    with pytest.raises(ValueError, match="scalar"):
        y.backward()
    with pytest.raises(ValueError, match="grad must have shape"):
        y.backward(np.ones(3))
    y.backward(np.ones((2, 2)))
    np.testing.assert_allclose(w.grad, 2 * np.ones((2, 2)))


def test_only_tensors_that_require_grad_get_gradients():
    x = Tensor(np.ones((2, 3)))
    w = Tensor(np.ones((4, 3)), requires_grad=True)
    F.linear(x, w).sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(w.grad, np.full((4, 3), 2.0))


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 5000], rtol=1e-9)


def test_custom_function_with_save_for_backward():
    class Cube(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x ** 2

    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    Cube.apply(x).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 12.0])


def test_custom_function_returning_wrong_gradient_count_is_reported():
    class Broken(Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, grad):
            return (grad,)

    a, b = Tensor(np.ones(2), requires_grad=True), Tensor(np.ones(2), requires_grad=True)
    with pytest.raises(RuntimeError, match="returned 1 gradients for 2 inputs"):
        Broken.apply(a, b).sum().backward()


def test_operators_with_numbers_and_arrays():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (2 - x) / 4 + 1 * x ** 2 - (-x) + np.array([1.0, 1.0]) * x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, -0.25 + 2 * np.array([1.0, 2.0]) + 1 + 1)
    assert y.dtype == np.float64


def test_a_small_network_learns_on_the_cpu():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 6, 6)).astype(np.float32)
    labels = (x[:, 0, :3].mean(axis=(1, 2)) > x[:, 0, 3:].mean(axis=(1, 2))).astype(np.int64)
    w1 = Tensor(rng.standard_normal((4, 1, 3, 3)).astype(np.float32) * 0.5, requires_grad=True)
    b1 = Tensor(np.zeros(4, np.float32), requires_grad=True)
    w2 = Tensor(rng.standard_normal((2, 36)).astype(np.float32) * 0.1, requires_grad=True)
    losses = []
    for _ in range(30):
        h = F.max_pool2x2(F.relu(F.conv3x3(Tensor(x), w1, b1)))
        loss = F.softmax_cross_entropy(F.linear(F.flatten(h), w2), labels)
        for p in (w1, b1, w2):
            p.zero_grad()
        loss.backward()
        with pycnn.no_grad():
            for p in (w1, b1, w2):
                p.data -= 0.3 * p.grad
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_profile_counts_every_op_call():
    x = Tensor(np.ones((2, 3, 4, 4), np.float32))
    w = Tensor(np.ones((2, 3, 3, 3), np.float32), requires_grad=True)
    with pycnn.profile() as p:
        F.relu(F.conv3x3(x, w)).sum().backward()
    ops = {key[0]: calls for key, calls in p.calls.items() if key[3] == "forward"}
    assert ops == {"conv3x3": 1, "relu": 1, "sum": 1}
    assert sum(calls for key, calls in p.calls.items() if key[3] == "backward") == 3
    assert p.total() > 0 and "conv3x3" in p.table()


# ------------------------------------------------------------- interop with other arrays

class _FakeCudaArray:
    """Just enough of a device array for the Tensor's interop properties (no GPU needed)."""

    def __init__(self, shape):
        self.shape, self.dtype, self.ndim, self.size = shape, np.dtype(np.float32), len(shape), int(np.prod(shape))
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False), "version": 3,
                                         "strides": None}


def test_array_protocol_gives_the_host_data():
    data = np.arange(6.0).reshape(2, 3)
    t = Tensor(data)
    a = np.asarray(t)
    assert a.dtype == np.float64 and a.shape == (2, 3) and np.shares_memory(a, data)  # was a 0-d object array
    assert np.asarray(t, dtype=np.float32).dtype == np.float32
    copied = np.array(t, copy=True)
    assert not np.shares_memory(copied, data)
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(t, dtype=np.float32, copy=False)
    np.testing.assert_array_equal(np.exp(t), np.exp(data))
    assert isinstance(np.ones((2, 3)) * t, Tensor)  # ndarray op Tensor still makes a Tensor


def test_cuda_data_has_the_cuda_interface_and_refuses_implicit_host_copies():
    host = Tensor(np.ones(3))
    assert not hasattr(host, "__cuda_array_interface__")
    device = Tensor(np.ones(3))
    device.data = _FakeCudaArray((3,))
    assert device.__cuda_array_interface__["shape"] == (3,)
    with pytest.raises(TypeError, match=r"\.numpy\(\)"):
        np.asarray(device)


def test_dlpack_export_shares_memory():
    torch = pytest.importorskip("torch")
    t = Tensor(np.zeros((2, 3), np.float32))
    assert t.__dlpack_device__() == (1, 0)
    as_torch = torch.from_dlpack(t)
    as_numpy = np.from_dlpack(t)
    t.data[0, 1] = 5.0
    assert float(as_torch[0, 1]) == 5.0 and as_numpy[0, 1] == 5.0


def test_from_dlpack_and_torch_tensors_are_taken_without_a_copy():
    torch = pytest.importorskip("torch")
    source = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for t in (pycnn.from_dlpack(source), Tensor(source), Tensor(source.requires_grad_())):
        assert isinstance(t.data, np.ndarray) and t.data.__array_interface__["data"][0] == source.data_ptr()
    assert pycnn.from_dlpack(np.ones(2)).dtype == np.float64
    assert Tensor(torch.arange(3)).dtype == np.float32  # integers become float32, as from NumPy
    with pytest.raises(TypeError, match="__dlpack__"):
        pycnn.from_dlpack(np.ones(2).__dlpack__())  # a bare capsule


def test_functional_calls_take_torch_tensors():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    y = F.max_pool2x2(F.relu(F.conv3x3(x, w)))
    assert isinstance(y, Tensor) and isinstance(y.data, np.ndarray)
    expected = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w, padding=1)), 2)
    np.testing.assert_allclose(y.data, expected.numpy(), rtol=1e-5, atol=1e-5)
    # labels and running statistics as torch tensors; the statistics are updated in place
    logits = Tensor(torch.randn(4, 5, generator=gen), requires_grad=True)
    labels = torch.tensor([1, 0, 4, 2])
    loss = F.softmax_cross_entropy(logits, labels)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits.data), labels)
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-6)
    mean, var = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, torch.ones(3), torch.zeros(3), mean, var, training=True, momentum=1.0)
    np.testing.assert_allclose(mean.numpy(), x.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    # a Tensor with torch data learns: the gradient is a NumPy array
    weight = Tensor(torch.randn(4, 3, 3, 3, generator=gen), requires_grad=True)
    F.conv3x3(x, weight).sum().backward()
    assert isinstance(weight.grad, np.ndarray) and weight.grad.shape == (4, 3, 3, 3)


def test_custom_function_takes_torch_tensors():
    torch = pytest.importorskip("torch")

    class Double(Function):
        @staticmethod
        def forward(ctx, x):
            assert isinstance(x, np.ndarray)
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    np.testing.assert_array_equal(Double.apply(torch.ones(3)).data, np.full(3, 2.0))


# ------------------------------------- found by an independent sweep (fifth session)

def test_a_second_backward_through_a_freed_graph_says_so():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="a second time: the first backward freed"):
        y.backward()


def test_gradients_are_arrays_of_their_own():
    """a.grad was b.grad after (a + b).backward(g), and x.grad was the caller's g."""
    a, b = (Tensor(np.ones(3), requires_grad=True) for _ in range(2))
    (a + b).backward(np.ones(3))
    assert a.grad is not b.grad
    g = np.ones((2, 3))
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    x.backward(g)
    g[0, 0] = 99.0
    assert x.grad[0, 0] == 1.0
    z = Tensor(np.ones((2, 3)), requires_grad=True)
    z.reshape(6).backward(np.ones(6))
    assert z.grad.base is None


def test_pow_zero_flatten_of_an_empty_batch_and_none_operands():
    x = Tensor(np.array([0.0, 1.0]), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])  # was [nan, 0]: 0 * 0**-1
    assert Tensor(np.ones((0, 3, 4))).flatten().shape == (0, 12)
    with pytest.raises(TypeError, match="b must be a Tensor, an array or a number, got None"):
        Tensor(np.ones(3)) + None
