"""The rectifier family and friends: NumPy references (the spec every backend matches).

Subgradient convention at x == 0: every rectifier uses its negative branch (gradient 0
for relu, the slope for leaky/prelu/rrelu, alpha for elu), as PyTorch does.
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
from pycnn.device import array_module
from pycnn.ops.registry import Api, Epilogue, Sample, declare, map_bench


def _per_element(count: int, itemsize_factor: bool = False):
    if itemsize_factor:
        return lambda x_shape, *rest, itemsize=4, **params: count * itemsize * int(np.prod(x_shape))
    return lambda x_shape, *rest, **params: count * int(np.prod(x_shape))


def _map_costs(forward_flops: int, backward_flops: int) -> dict:
    """The costs of a map over x (per element of x): forward reads x and writes y (2 arrays),
    backward reads x and grad_y and writes grad_x (3 arrays; prelu's O(C) weight and
    gradient are left out, rrelu draws its slopes again)."""
    return {"flops": _per_element(forward_flops), "backward_flops": _per_element(backward_flops),
            "bytes": _per_element(2, True), "backward_bytes": _per_element(3, True)}


def _functional(name, **fixed):
    """torch.nn.functional.<name>, imported when first called."""
    def call(*args, **params):
        import torch.nn.functional as F
        return getattr(F, name)(*args, **fixed, **params)
    return call


def _check_x(x, **params):
    _util.check_float("x", x)


def _x_samples(rng, dtype):
    """Odd sizes, a batch of one, 2-D and 4-D; values kept away from the kink at 0."""
    def away_from_zero(shape):
        v = rng.standard_normal(shape)
        return (v + np.sign(v) * 0.05).astype(dtype)
    return [Sample((away_from_zero((2, 3, 5, 4)),)), Sample((away_from_zero((1, 7)),)),
            Sample((away_from_zero((3, 2, 1, 3)),))]


# --------------------------------------------------------------------------------- relu

def relu_forward(ctx, x):
    ctx.save_for_backward(x)
    return array_module(x).maximum(x, x.dtype.type(0))


def relu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return (grad * (x > 0),)


declare("relu", forward=relu_forward, backward=relu_backward, check=_check_x, **_map_costs(1, 1),
        samples=_x_samples, torch=_functional("relu"), bench=map_bench(), elementwise=(),
        conv_epilogue=Epilogue(grad_from_output=lambda params, weight: True),
        api=Api("relu", "ReLU", "max(x, 0).", activation=True, torch_layer="ReLU", torch_inplace=True))


# --------------------------------------------------------------------------- leaky_relu

def _check_x_and_number(name: str, default: float):
    """The check of a map with one finite number parameter (leaky_relu's slope, elu's alpha)."""
    def check(x, **params):
        _check_x(x)
        _util.check_finite_number(name, params.get(name, default))
    return check


_check_leaky = _check_x_and_number("slope", 0.01)


def leaky_relu_forward(ctx, x, slope=0.01):
    ctx.save_for_backward(x)
    ctx.slope = slope
    xp = array_module(x)
    return xp.where(x > 0, x, x * x.dtype.type(slope))


def leaky_relu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    xp = array_module(x)
    return (xp.where(x > 0, grad, grad * x.dtype.type(ctx.slope)),)


def _leaky_samples(rng, dtype):
    return [Sample(s.inputs, {"slope": slope}) for s, slope in zip(_x_samples(rng, dtype), (0.01, 0.2, -0.5))]


declare("leaky_relu", forward=leaky_relu_forward, backward=leaky_relu_backward, check=_check_leaky,
        **_map_costs(2, 2), samples=_leaky_samples, torch=lambda x, slope=0.01: _functional("leaky_relu")(x, slope),
        bench=map_bench({"slope": 0.01}), elementwise=(("slope", 0.01, float),),
        # y > 0 exactly when z > 0 for a slope >= 0; a negative slope makes both branches >= 0
        conv_epilogue=Epilogue(params=("slope",), flops=2,
                               grad_from_output=lambda params, weight: params.get("slope", 0.01) >= 0),
        api=Api("leaky_relu", "LeakyReLU", "x where x > 0, else slope * x.", settings=(("slope", 0.01, float),),
                activation=True, torch_layer="LeakyReLU", torch_settings={"slope": "negative_slope"},
                torch_inplace=True))


# -------------------------------------------------------------------------------- prelu
# x is (N, C, ...) with channels on axis 1; weight is (C,): one learnable slope per channel.

def _check_prelu(x, weight):
    _util.check_float_arrays(x=x, weight=weight)
    _util.check_ndim("x", x, (2, 3, 4, 5))
    _util.check_ndim("weight", weight, 1)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must have one slope per channel of x ({x.shape[1]}), got shape {tuple(weight.shape)}")


def _per_channel(weight, ndim):
    """(C,) -> (1, C, 1, ...) so that it broadcasts over an ndim-dimensional x."""
    return weight.reshape((1, -1) + (1,) * (ndim - 2))


def prelu_forward(ctx, x, weight):
    ctx.save_for_backward(x, weight)
    xp = array_module(x)
    return xp.where(x > 0, x, x * _per_channel(weight, x.ndim))


def prelu_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    xp = array_module(x)
    grad_x = xp.where(x > 0, grad, grad * _per_channel(weight, x.ndim))
    axes = (0,) + tuple(range(2, x.ndim))
    grad_weight = xp.where(x > 0, 0, grad * x).sum(axis=axes).astype(x.dtype)
    return grad_x, grad_weight


def _prelu_samples(rng, dtype):
    cases = []
    for s in _x_samples(rng, dtype)[:1] + _x_samples(rng, dtype)[2:]:
        x = s.inputs[0]
        cases.append(Sample((x, rng.uniform(0.05, 0.5, x.shape[1]).astype(dtype))))
    cases.append(Sample((rng.standard_normal((4, 5)).astype(dtype) + 0.1, rng.uniform(-0.3, 0.3, 5).astype(dtype))))
    return cases


def _prelu_bench_inputs(rng, shapes, params):
    x_shape, w_shape = shapes
    return (rng.standard_normal(x_shape, dtype=np.float32), rng.uniform(0.05, 0.3, w_shape).astype(np.float32)), params


declare("prelu", forward=prelu_forward, backward=prelu_backward, check=_check_prelu, **_map_costs(2, 3),
        samples=_prelu_samples, torch=_functional("prelu"), bench=map_bench(weight=True),
        bench_inputs=_prelu_bench_inputs,
        # y > 0 exactly when z > 0 where every slope is > 0 (the weight gradient is then sum(g * y) / a)
        conv_epilogue=Epilogue(weight=True, flops=2,
                               grad_from_output=lambda params, weight: bool((weight > 0).all())),
        api=Api("prelu", "PReLU", "Leaky ReLU with a learned slope per channel (axis 1; He et al. 2015): weight "
                "is (C,).", weight=("initial_slope", 0.25), activation=True, torch_layer="PReLU"))


# -------------------------------------------------------------------------------- rrelu
# Randomized leaky ReLU (Xu et al. 2015).  Training: each element gets its own slope
# 1/a with a ~ U(lower, upper) (default U(3, 8)), drawn afresh at every forward from the
# counter-based stream of ``seed``.  Evaluation: the fixed slope 2 / (lower + upper).

def _check_rrelu(x, lower=3.0, upper=8.0, training=False, seed=0):
    _check_x(x)
    lower = _util.check_positive_number("lower", lower)
    upper = _util.check_positive_number("upper", upper)
    if upper < lower:
        raise ValueError(f"upper must be >= lower, got lower={lower}, upper={upper}")
    _util.check_seed(seed)


def rrelu_slopes(x, lower, upper, training, seed):
    """The slope of every element of x (an array shaped like x, or a scalar in evaluation)."""
    if not training:
        return x.dtype.type(2.0 / (lower + upper))
    u = _util.uniform(seed, x.size, x.dtype, like=x).reshape(x.shape)
    dtype = x.dtype.type
    return dtype(1) / (dtype(lower) + dtype(upper - lower) * u)


def rrelu_forward(ctx, x, lower=3.0, upper=8.0, training=False, seed=0):
    slopes = rrelu_slopes(x, lower, upper, training, seed)
    ctx.save_for_backward(x, slopes)
    return array_module(x).where(x > 0, x, x * slopes)


def rrelu_backward(ctx, grad):
    x, slopes = ctx.saved_tensors
    return (array_module(x).where(x > 0, grad, grad * slopes),)


def _rrelu_samples(rng, dtype):
    xs = _x_samples(rng, dtype)
    return [Sample(xs[0].inputs, {"training": True, "seed": 7}),
            Sample(xs[1].inputs, {"training": True, "seed": 2 ** 63 + 5, "lower": 2.0, "upper": 4.0}),
            Sample(xs[2].inputs, {"training": False})]


def _torch_rrelu(x, lower=3.0, upper=8.0, training=False, seed=0):
    """Written with pycnn's counter-based draws (torch's generator differs): checks the slopes."""
    import torch
    import torch.nn.functional as F
    if not training:
        return F.leaky_relu(x, 2.0 / (lower + upper))
    u = torch.as_tensor(_util.uniform(seed, x.numel(), np.dtype(np.float64))).reshape(x.shape)
    slopes = 1.0 / (lower + (upper - lower) * u)
    return torch.where(x > 0, x, x * slopes)


def _torch_native_rrelu(x, lower=3.0, upper=8.0, training=False, seed=0):
    import torch.nn.functional as F
    return F.rrelu(x, 1 / upper, 1 / lower, training=training)  # torch's bounds are the slopes


declare("rrelu", forward=rrelu_forward, backward=rrelu_backward, check=_check_rrelu, **_map_costs(12, 12),
        samples=_rrelu_samples, torch=_torch_rrelu, torch_native=_torch_native_rrelu,
        bench=map_bench({"training": True, "seed": 1}),
        elementwise=(("lower", 3.0, float), ("upper", 8.0, float), ("seed", 0, int), ("training", False, bool)),
        api=Api("rrelu", "RReLU", "Randomized leaky ReLU (Xu et al. 2015): in training a slope 1/U(lower, upper) "
                "per element, drawn at every call; the fixed slope 2/(lower+upper) in evaluation.",
                settings=(("lower", 3.0, float), ("upper", 8.0, float), ("training", False, bool),
                          ("seed", None, int)), activation=True, torch_inplace=True))


# ---------------------------------------------------------------------------------- elu

_check_elu = _check_x_and_number("alpha", 1.0)


def elu_forward(ctx, x, alpha=1.0):
    ctx.save_for_backward(x)
    ctx.alpha = alpha
    xp = array_module(x)
    return xp.where(x > 0, x, x.dtype.type(alpha) * xp.expm1(xp.minimum(x, 0)))


def elu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    xp = array_module(x)
    return (xp.where(x > 0, grad, grad * x.dtype.type(ctx.alpha) * xp.exp(xp.minimum(x, 0))),)


def _elu_samples(rng, dtype):
    return [Sample(s.inputs, {"alpha": a}) for s, a in zip(_x_samples(rng, dtype), (1.0, 0.5, 2.0))]


declare("elu", forward=elu_forward, backward=elu_backward, check=_check_elu, **_map_costs(4, 4),
        samples=_elu_samples, torch=lambda x, alpha=1.0: _functional("elu")(x, alpha),
        bench=map_bench({"alpha": 1.0}), elementwise=(("alpha", 1.0, float),),
        # its derivative alpha * exp(z) read off the output as y + alpha cancels for z << 0
        conv_epilogue=Epilogue(params=("alpha",), flops=4),
        api=Api("elu", "ELU", "x where x > 0, else alpha * (exp(x) - 1) (Clevert et al. 2015).",
                settings=(("alpha", 1.0, float),), activation=True, torch_layer="ELU", torch_inplace=True))


# -------------------------------------------------------------------------- sigmoid, tanh

def sigmoid_forward(ctx, x):
    xp = array_module(x)
    one = x.dtype.type(1)
    # e = exp(-|x|) <= 1 never overflows, and both branches are quotients, so small outputs are
    # relatively accurate too (0.5 * (tanh(x / 2) + 1) rounds sigmoid(-20) = 2.06e-9 to 0 in float32)
    e = xp.exp(-xp.abs(x))
    ctx.save_for_backward(x)
    return xp.where(x >= 0, one, e) / (one + e)


def sigmoid_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    xp = array_module(x)
    # sigmoid'(x) = sigmoid(x) sigmoid(-x) = e / (1 + e)^2 from x: y * (1 - y) cancels where y rounds to 1
    e = xp.exp(-xp.abs(x))
    s = x.dtype.type(1) / (x.dtype.type(1) + e)
    return (grad * (e * s * s),)


def _torch_method(name):
    return lambda x: getattr(x, name)()


declare("sigmoid", forward=sigmoid_forward, backward=sigmoid_backward, check=_check_x, **_map_costs(4, 5),
        samples=_x_samples, torch=_torch_method("sigmoid"), bench=map_bench(), elementwise=(),
        api=Api("sigmoid", "Sigmoid", "1 / (1 + exp(-x)).", torch_layer="Sigmoid"))


def tanh_forward(ctx, x):
    ctx.save_for_backward(x)
    return array_module(x).tanh(x)


def tanh_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    xp = array_module(x)
    # 1 - tanh(x)^2 = 4 e / (1 + e)^2, e = exp(-2|x|), from x: 1 - y * y cancels where y rounds to +-1
    e = xp.exp(x.dtype.type(-2) * xp.abs(x))
    s = x.dtype.type(1) / (x.dtype.type(1) + e)
    return (grad * (x.dtype.type(4) * e * s * s),)


declare("tanh", forward=tanh_forward, backward=tanh_backward, check=_check_x, **_map_costs(4, 6),
        samples=_x_samples, torch=_torch_method("tanh"), bench=map_bench(), elementwise=(),
        api=Api("tanh", "Tanh", "The hyperbolic tangent.", activation=True, torch_layer="Tanh"))


# ----------------------------------------------------------------------- swish (SiLU)
# y = x * sigmoid(x) (Ramachandran et al. 2017; PyTorch's silu).  Through e = exp(-|x|) as
# sigmoid: nothing overflows, and the limits hold at the ends: y(-inf) = 0, y(+inf) = +inf,
# y'(-inf) = 0, y'(+inf) = 1 (PyTorch gives NaN at -inf and NaN gradients at +-inf).

def swish_forward(ctx, x):
    xp = array_module(x)
    one = x.dtype.type(1)
    e = xp.exp(-xp.abs(x))
    s = xp.where(x >= 0, one, e) / (one + e)  # sigmoid(x)
    ctx.save_for_backward(x)
    return xp.where(x == -xp.inf, x.dtype.type(0), x) * s  # -inf * 0 would be NaN


def swish_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    xp = array_module(x)
    one = x.dtype.type(1)
    # y' = s + x s (1 - s), with s (1 - s) = e / (1 + e)^2 from x (no cancellation where s rounds to 1)
    e = xp.exp(-xp.abs(x))
    r = one / (one + e)
    s = xp.where(x >= 0, one, e) * r
    return (grad * (s + xp.where(e > 0, x, x.dtype.type(0)) * e * r * r),)  # e == 0: x is +-inf (or huge)


def _swish_samples(rng, dtype):
    """The usual sizes, then large |x| and the edge values (no gradient check: inf, NaN)."""
    big = np.array([[-800.0, -100.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 100.0, 800.0]], dtype=dtype)
    edges = np.array([[-np.inf, np.inf, np.nan, -1e38, 1e38, 0.5]], dtype=dtype)
    return _x_samples(rng, dtype) + [Sample((big,), gradcheck=False),
                                     Sample((edges,), gradcheck=False, torch_agrees=False)]


declare("swish", forward=swish_forward, backward=swish_backward, check=_check_x, **_map_costs(5, 7),
        samples=_swish_samples, torch=_functional("silu"), bench=map_bench(), elementwise=(),
        conv_epilogue=Epilogue(flops=5),  # its gradient needs z (y does not determine it)
        api=Api("swish", "SiLU", "x * sigmoid(x) (SiLU); 0 at -inf, its gradient 0 and 1 at -inf and +inf.",
                function_aliases=("silu",), layer_aliases=("Swish",), activation=True, torch_layer="SiLU",
                torch_inplace=True))


# ------------------------------------------------------------------------------- maxout
# Maxout over channels (Goodfellow et al. 2013): x is (N, C*k, ...); output channel j is the
# max over the k consecutive input channels [j*k, (j+1)*k).  Ties (and NaN) go to the first.

def _check_maxout(x, pieces=2):
    _check_x(x)
    _util.check_ndim("x", x, (2, 3, 4, 5))
    if isinstance(pieces, bool) or not isinstance(pieces, (int, np.integer)) or pieces < 1:
        raise ValueError(f"pieces must be a positive integer, got {pieces!r}")
    if x.shape[1] % pieces:
        raise ValueError(f"x must have a channel count divisible by pieces={pieces}, got {x.shape[1]} channels")


def maxout_shape(x_shape, pieces=2):
    """(N, C*k, ...) -> (N, C, ...)"""
    return (x_shape[0], x_shape[1] // pieces) + tuple(x_shape[2:])


def _grouped(x, pieces):
    """(N, C*k, ...) -> (N, C, k, ...)"""
    return x.reshape((x.shape[0], x.shape[1] // pieces, pieces) + tuple(x.shape[2:]))


def maxout_forward(ctx, x, pieces=2):
    xp = array_module(x)
    groups = _grouped(x, pieces)
    winner = xp.argmax(groups, axis=2)  # (N, C, ...), the first maximum
    ctx.save_for_backward(winner)
    ctx.x_shape, ctx.pieces = x.shape, pieces
    return xp.take_along_axis(groups, xp.expand_dims(winner, 2), axis=2).squeeze(2)


def maxout_backward(ctx, grad):
    (winner,) = ctx.saved_tensors
    xp = array_module(grad)
    pieces = ctx.pieces
    hit = xp.expand_dims(winner, 2) == xp.arange(pieces).reshape((1, 1, pieces) + (1,) * (winner.ndim - 2))
    return ((hit * xp.expand_dims(grad, 2)).reshape(ctx.x_shape),)


def _maxout_samples(rng, dtype):
    return [Sample((rng.standard_normal((2, 6, 3, 5)).astype(dtype),), {"pieces": 3}),
            Sample((rng.standard_normal((3, 8)).astype(dtype),), {"pieces": 2}),
            Sample((rng.standard_normal((1, 4, 2, 2)).astype(dtype),), {"pieces": 4})]


def _maxout_bytes(x_shape, itemsize=4, pieces=2):
    """Forward: read x (E elements), write y (E/k) and the winner of each group (1 byte);
    backward: read grad_y (E/k) and the winners, write grad_x (E): the same bytes."""
    elements = int(np.prod(x_shape))
    return itemsize * elements + itemsize * elements // pieces + elements // pieces


def _torch_maxout(x, pieces=2):
    n, c = x.shape[:2]
    return x.reshape((n, c // pieces, pieces) + tuple(x.shape[2:])).max(dim=2).values


declare("maxout", forward=maxout_forward, backward=maxout_backward, check=_check_maxout,
        flops=lambda x_shape, pieces=2: int(np.prod(x_shape)), backward_flops=lambda x_shape, pieces=2: 0,
        bytes=_maxout_bytes, backward_bytes=_maxout_bytes, samples=_maxout_samples, torch=_torch_maxout,
        bench=map_bench({"pieces": 2}),
        api=Api("maxout", "Maxout", "Max over groups of pieces consecutive channels (Goodfellow et al. 2013): "
                "(N, C*k, ...) -> (N, C, ...).", settings=(("pieces", 2, int),)))
