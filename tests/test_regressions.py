"""Regression tests of issue 9, section 1: numerics and input handling of the C++ backend.

Each test here failed before its fix (the property-based sweeps over shapes, dtypes, layouts
and magnitudes are in test_properties.py).  Exact values come from float64 / np.longdouble
formulas, never from the code under test."""
from __future__ import annotations

import copy

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")

import pycnn.functional as F  # noqa: E402
from pycnn.autograd import Context, Tensor  # noqa: E402
from pycnn.ops import _util, registry  # noqa: E402

DTYPES = [np.float32, np.float64]


def impl(name, backend="cpp", algo="default"):
    op = registry.get(name)
    assert algo in op.algorithms(backend), f"{name} has no {backend}/{algo} implementation"  # loads the backend
    return op.impls[(backend, algo)]


def run(implementation, inputs, params=None, grad=None):
    """(output, input gradients or None) of one implementation, every output NaN-filled first."""
    ctx = Context(tuple(x is not None for x in inputs))
    with _util.nan_filled_outputs():
        y = np.array(implementation.forward(ctx, *inputs, **(params or {})), copy=True)
        grads = None if grad is None else tuple(None if g is None else np.array(g) for g in
                                                implementation.backward(ctx, grad))
    return y, grads


# ----------------------------------------------------- fused conv3x3_act with elu (csrc/conv3x3_act.cpp)

@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_elu_bias_gradient_at_a_very_negative_preactivation(dtype):
    # the issue's example: d/db elu(0 * w + b) at b = -20 is exp(-20) = 2.06e-9; y + alpha gave 0
    x, w = np.zeros((1, 1, 1, 1), dtype), np.ones((1, 1, 3, 3), dtype)
    b = Tensor(np.array([-20.0], dtype), requires_grad=True)
    F.conv3x3_act(x, w, b, activation="elu").backward(np.ones((1, 1, 1, 1), dtype))
    np.testing.assert_allclose(b.grad, [np.exp(-20.0)], rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("algo", ["direct", "winograd"])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_elu_equals_conv_then_elu_at_negative_preactivations(dtype, alpha, algo):
    # one output channel per depth of z: around -3, -12 (relative errors of 1.6e-2 were seen there
    # in float32), -20 and -28 (where y rounds to -alpha and the gradient was 0)
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((2, 3, 6, 7))).astype(dtype)
    w = (rng.standard_normal((4, 3, 3, 3)) / 9).astype(dtype)
    b = np.array([-3.0, -12.0, -20.0, -28.0], dtype)
    g = rng.standard_normal((2, 4, 6, 7)).astype(dtype)
    y, (gx, gw, gb, _) = run(impl("conv3x3_act", algo=algo), (x, w, b, None),
                             {"activation": "elu", "alpha": alpha}, g)
    z, _ = run(impl("conv3x3", algo=algo), (x, w, b))
    y2, (gz,) = run(impl("elu"), (z,), {"alpha": alpha}, g)
    _, (gx2, gw2, gb2) = run(impl("conv3x3", algo=algo), (x, w, b), grad=gz)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y, y2, rtol=rtol)
    for got, want in ((gb, gb2), (gw, gw2), (gx, gx2)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    # and the bias gradient is alpha * sum(g * exp(z)), channel by channel, relatively
    exact = alpha * (g.astype(np.float64) * np.exp(z.astype(np.float64))).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(gb, exact, rtol=1e-5 if dtype == np.float32 else 1e-12)


# --------------------------------------------------------------- batch norm statistics (csrc/batchnorm.cpp)

def _normalised_exactly(x, axes, eps=1e-5):
    """(x - mean) / sqrt(var + eps) in np.longdouble (64-bit mantissa on x86)."""
    xl = x.astype(np.longdouble)
    d = xl - xl.mean(axis=axes, keepdims=True)
    return d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + eps)


@pytest.mark.parametrize("shape", [(8, 4), (6, 3, 5, 7)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("centre,atol", [(1e3, 1e-11), (1e8, 5e-8)])
def test_batch_norm_of_float64_data_far_from_zero(shape, centre, atol):
    # E[x^2] - E[x]^2: errors of 2e-7 around 1e3 (NumPy: 1e-13), std 268 instead of 1 around 1e8.
    # Around 1e8 the data themselves are only known to ulp(1e8) = 1.5e-8, hence that atol.
    x = centre + np.random.default_rng(0).standard_normal(shape)
    c = shape[1]
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    y = F.batch_norm(x, np.ones(c), np.zeros(c)).numpy()
    np.testing.assert_allclose(y, _normalised_exactly(x, axes).astype(np.float64), rtol=0, atol=atol)
    np.testing.assert_allclose(y.std(axis=axes), 1.0, rtol=1e-4)  # eps = 1e-5 in the denominator


def test_batch_norm_running_variance_far_from_zero():
    x = 1e8 + np.random.default_rng(1).standard_normal((16, 3, 4, 4))
    running_mean, running_var = np.zeros(3), np.ones(3)
    run(impl("batchnorm"), (x, np.ones(3), np.zeros(3)),
        {"running_mean": running_mean, "running_var": running_var, "momentum": 0.5})
    xl = x.astype(np.longdouble)
    exact_var = ((xl - xl.mean(axis=(0, 2, 3), keepdims=True)) ** 2).sum(axis=(0, 2, 3)) / (x[:, 0].size - 1)
    np.testing.assert_allclose(running_var, (0.5 + 0.5 * exact_var).astype(np.float64), rtol=1e-7)
    np.testing.assert_allclose(running_mean, (0.5 * xl.mean(axis=(0, 2, 3))).astype(np.float64), rtol=1e-15)


# ------------------------------------------------------ sigmoid and tanh (pycnn/ops/activations.py, csrc/maps.cpp)

def _sigmoid_exact(x):
    x = x.astype(np.longdouble)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_of_very_negative_inputs_is_relatively_accurate(backend, dtype):
    # 0.5 * (tanh(x / 2) + 1): sigmoid(-20) = 0 in float32 (true 2.06e-9); the C++ kernel
    # flushed the subnormal results (x < -87.3 in float32, < -708 in float64) to 0
    lo = -87.0 if dtype == np.float32 else -708.0
    x = np.concatenate([[-20.0], np.linspace(lo, -5, 1001)]).astype(dtype)
    y, _ = run(impl("sigmoid", backend, "reference" if backend == "numpy" else "default"), (x,))
    np.testing.assert_allclose(y, _sigmoid_exact(x).astype(np.float64), rtol=8 * np.finfo(dtype).eps)
    if backend == "cpp":  # subnormal outputs: within one spacing of the exact value
        tiny = np.array([-100.0, -95.0, -90.0] if dtype == np.float32 else [-740.0, -730.0, -720.0], dtype)
        y, _ = run(impl("sigmoid"), (tiny,))
        spacing = np.finfo(dtype).smallest_subnormal
        assert np.all(y > 0)
        np.testing.assert_allclose(y, _sigmoid_exact(tiny).astype(np.float64), rtol=0, atol=1.01 * spacing)


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_and_tanh_gradients_where_the_output_rounds_to_one(backend, dtype):
    # y * (1 - y) and 1 - y^2 from the saved output: 0 once y rounds to +-1 (sigmoid(20) and
    # tanh(10) do in float32), where sigmoid'(20) = 2.06e-9 and tanh'(10) = 8.2e-9
    algo = "reference" if backend == "numpy" else "default"
    x = np.array([20.0, -20.0, 10.0, 30.0, 1e-3, 0.0] if dtype == np.float32 else [40.0, -40.0, 20.0, 300.0, 1e-9, 0.0],
                 dtype)
    xl = x.astype(np.longdouble)
    g = np.ones_like(x)
    _, (gs,) = run(impl("sigmoid", backend, algo), (x,), grad=g)
    es = np.exp(-np.abs(xl))
    np.testing.assert_allclose(gs, (es / (1 + es) ** 2).astype(np.float64), rtol=8 * np.finfo(dtype).eps)
    _, (gt,) = run(impl("tanh", backend, algo), (x,), grad=g)
    np.testing.assert_allclose(gt, (1 / np.cosh(xl) ** 2).astype(np.float64), rtol=8 * np.finfo(dtype).eps)


# ------------------------------------------------ any valid NumPy array (pycnn/ops/_util.py, kernel_array)

def _unaligned(a):
    """A copy of ``a`` whose data start one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 1, np.uint8)[1:]
    out = buf.view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


# the layouts the C++ wrappers refused (the others, sliced, transposed, negative strides,
# read-only: test_properties.py)
LAYOUTS = {"unaligned": _unaligned, "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">"))}


def test_relu_of_the_issues_unaligned_array():
    x = np.zeros(33, np.uint8)[1:].view(np.float32)  # ValueError: relu_forward: x must be aligned
    np.testing.assert_array_equal(F.relu(x).numpy(), np.zeros(8, np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_pool_relu_take_any_layout(layout, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 8)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    g = rng.standard_normal((2, 4, 3, 4)).astype(dtype)
    change = LAYOUTS[layout]

    def net(x, w, b):
        xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
        y = F.max_pool2x2(F.relu(F.conv3x3(xt, wt, bt)))
        y.backward(g)
        return y.numpy(), xt.grad, wt.grad, bt.grad

    expected = net(x, w, b)
    for got, want in zip(net(change(x), change(w), change(b)), expected):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_cpp_op_takes_any_layout_of_its_inputs_and_gradient(layout):
    # every registry sample of every C++ implementation, inputs and incoming gradient in `layout`
    change = LAYOUTS[layout]
    checked = 0
    for op in registry.all_ops():
        for algo in op.algorithms("cpp"):
            implementation = op.impls[("cpp", algo)]
            for sample in op.samples(np.random.default_rng(0), np.dtype(np.float32)):
                float_input = [x is not None and x.dtype.kind == "f" for x in sample.inputs]
                y, _ = run(implementation, sample.inputs, copy.deepcopy(sample.params))
                grad = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
                y, grads = run(implementation, sample.inputs, copy.deepcopy(sample.params), grad)
                inputs = tuple(change(x) if f else x for x, f in zip(sample.inputs, float_input))
                y2, grads2 = run(implementation, inputs, copy.deepcopy(sample.params), change(grad))
                np.testing.assert_array_equal(y2, y, err_msg=f"{op.name}/{algo}")
                for g2, g1 in zip(grads2, grads):
                    if g1 is not None:
                        np.testing.assert_array_equal(g2, g1, err_msg=f"{op.name}/{algo} gradient")
                checked += 1
    assert checked > 40


def test_direct_calls_of_the_private_module_name_the_argument():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="relu_forward: x must be in native byte order, got >f4"):
        C.relu_forward(x.astype(">f4"), np.empty_like(x))
    with pytest.raises(ValueError, match="relu_forward: x must be aligned"):
        C.relu_forward(_unaligned(x), np.empty_like(x))


# ------------------------------------------------------- the same classes elsewhere (pycnn/ops/elementwise.py)

@pytest.mark.parametrize("dtype", DTYPES)
def test_division_gradient_where_b_squared_underflows(dtype):
    # -g * a / (b * b): b * b underflows to 0 and the gradient became -inf (true: -(a / b) / b)
    tiny = 1e-30 if dtype == np.float32 else 1e-170
    a, b = Tensor(np.array([tiny], dtype), requires_grad=True), Tensor(np.array([tiny], dtype), requires_grad=True)
    (a / b).backward(np.ones(1, dtype))
    np.testing.assert_allclose(a.grad, [1 / tiny], rtol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(b.grad, [-1 / tiny], rtol=4 * np.finfo(dtype).eps)


# ------------------------------------- Winograd with inf, NaN and huge inputs (csrc/conv3x3.hpp)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
def test_winograd_puts_inf_and_nan_where_the_direct_conv_does(algo, dtype):
    """One inf spread NaN over whole Winograd tiles (inf - inf in the transforms) and inf
    turned into NaN; now the outputs' NaN and inf are exactly the direct kernel's, with or
    without a fused relu (which would hide a NaN), and the finite values agree."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 9, 9, 10)).astype(dtype)
    w = rng.standard_normal((9, 9, 3, 3)).astype(dtype)
    x[0, 0, 3, 3], x[1, 2, 0, 9], x[1, 5, 6, 2] = np.inf, -np.inf, np.nan
    for name, params in (("conv3x3", {}), ("conv3x3_act", {"activation": "relu"})):
        inputs = (x, w, None) if name == "conv3x3" else (x, w, None, None)
        y, _ = run(impl(name, algo=algo), inputs, params)
        expected, _ = run(impl(name, algo="direct"), inputs, params)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(expected), err_msg=name)
        np.testing.assert_array_equal(np.isinf(y) * np.sign(y), np.isinf(expected) * np.sign(expected), err_msg=name)
        assert np.isinf(y).sum() > 0 and np.isnan(y).sum() > 0
        finite = np.isfinite(expected)
        np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-4 if dtype == np.float32 else 1e-10,
                                   atol=1e-3 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
def test_winograd_of_huge_float32_inputs_does_not_overflow_where_the_sums_do_not(algo):
    """float32 inputs near 1e37: the Winograd transforms overflowed (every output inf or NaN)
    where the sums themselves fit; now those outputs are finite and right."""
    rng = np.random.default_rng(32)
    x = (rng.standard_normal((1, 16, 8, 8)) * 1e37).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.05).astype(np.float32)
    y, _ = run(impl("conv3x3", algo=algo), (x, w, None))
    exact = F.conv3x3(x.astype(np.float64), w.astype(np.float64), algo="direct").numpy()
    assert np.isfinite(exact).all() and np.abs(exact).max() < 3e38
    assert np.isfinite(y).all()
    scale = F.conv3x3(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), algo="direct").numpy()
    assert np.all(np.abs(y - exact) <= 1e-5 * scale)
