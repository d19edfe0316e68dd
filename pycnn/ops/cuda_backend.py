"""The ``cuda`` backend: registry implementations on the Numba-CUDA kernels of ``pycnn.kernels``.

``load()`` runs the first time the backend is asked for (``pycnn.ops`` hooks it in with
``registry.add_backend_loader``), so importing pycnn never imports numba.  Each wrapper has
the signature of its reference (``forward(ctx, *inputs, **params)``, ``backward(ctx, grad)``),
allocates outputs with ``_util.empty`` on the inputs' device and launches the kernels on the
current CuPy stream (NumPy arrays under ``NUMBA_ENABLE_CUDASIM=1``).

Ops without a cuda implementation (linear, softmax_cross_entropy, batchnorm, reductions, ...)
run their array-generic reference on the same device.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np

from pycnn.device import array_module
from pycnn.ops import _util, registry

# ------------------------------------------------------------------------ finding kernels/

_SOURCE_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def kernels_package():
    """``pycnn.kernels``: the installed sub-package, or ``kernels/`` of a source checkout
    (``PYTHONPATH=<repo>``), where it sits beside ``pycnn/`` and is mapped in here."""
    try:
        return importlib.import_module("pycnn.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "pycnn.kernels" or not (_SOURCE_KERNELS / "__init__.py").is_file():
            raise
    spec = importlib.util.spec_from_file_location(
        "pycnn.kernels", _SOURCE_KERNELS / "__init__.py", submodule_search_locations=[str(_SOURCE_KERNELS)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["pycnn.kernels"] = package
    spec.loader.exec_module(package)
    import pycnn
    pycnn.kernels = package
    return package


def kernel_module(name: str):
    """``pycnn.kernels.<name>`` (imports numba)."""
    kernels_package()
    return importlib.import_module(f"pycnn.kernels.{name}")


# ----------------------------------------------------------------------------- wrappers
# K: the kernel modules, set by load().

class _Kernels:
    conv = gemm = pool = act = dropout = reduce = fancy_pca = bn = optim = None


K = _Kernels()


def _c(a):
    return None if a is None else _util.contiguous(a)


def _zeros(n, like):
    out = _util.empty((n,), like.dtype, like)
    K.reduce.zero(out)
    return out


# conv3x3 ------------------------------------------------------------------------------

def conv3x3_forward(ctx, x, weight, bias=None):
    x, weight = _c(x), _c(weight)
    n, _, h, w = x.shape
    k = weight.shape[0]
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    y = _util.empty((n, k, h, w), x.dtype, x)
    K.conv.conv3x3_forward(x, weight, _c(bias) if bias is not None else _zeros(k, x), y)
    return y


def conv3x3_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = _c(grad)
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _util.empty_like(x)
        K.conv.conv3x3_grad_input(grad, weight, _zeros(x.shape[1], x), grad_x)
    if ctx.needs_input_grad[1]:
        grad_weight = _util.empty_like(weight)
        K.conv.conv3x3_grad_weight(x, grad, grad_weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = _util.empty((weight.shape[0],), x.dtype, x)
        K.conv.conv3x3_grad_bias(grad, grad_bias)
    return grad_x, grad_weight, grad_bias


# conv3x3 and conv3x3_act as im2col + cuBLAS GEMM (kernels/conv_gemm.py) -------------------

def _keeps_pre_activation(activation, slope) -> bool:
    """Whether the backward needs z (the pre-activation) rather than y = act(z): relu and
    leaky relu with a positive slope read the sign of z off y; prelu (any slope), leaky
    relu with slope <= 0 and elu (whose y + alpha cancels for z << 0) need z itself."""
    return not (activation is None or activation == "relu" or (activation == "leaky_relu" and slope > 0))


def conv3x3_gemm_forward(ctx, x, weight, bias=None, prelu_weight=None, activation=None, slope=0.01, alpha=1.0):
    xp = array_module(x)
    x, weight = _c(x), _c(weight)
    n, c, h, w = x.shape
    k = weight.shape[0]
    cols = xp.empty((c * 9, n * h * w), dtype=x.dtype)     # fully written by im2col
    K.gemm.im2col(x, cols)
    y2 = xp.matmul(weight.reshape(k, c * 9), cols)         # (K, C*9) @ (C*9, P) -> (K, P)
    y = _util.empty((n, k, h, w), x.dtype, x)
    z = _util.empty((n, k, h, w), x.dtype, x) if _keeps_pre_activation(activation, slope) else None
    slopes = _c(prelu_weight) if prelu_weight is not None else None
    K.gemm.epilogue(y2, _c(bias) if bias is not None else None, slopes, y, z, activation, slope, alpha)
    needs = tuple(getattr(ctx, "needs_input_grad", ())) + (True,) * 4
    ctx.save_for_backward(cols if needs[1] else None, weight, z if z is not None else (y if activation else None),
                          slopes)
    ctx.shapes = (x.shape, k)
    ctx.has_bias = bias is not None
    ctx.act = (activation, slope, alpha)
    return y


def conv3x3_gemm_backward(ctx, grad):
    cols, weight, pre, slopes = ctx.saved_tensors
    (n, c, h, w), k = ctx.shapes
    activation, slope, alpha = ctx.act
    needs = tuple(ctx.needs_input_grad) + (False,) * 4
    xp = array_module(grad)
    grad = _c(grad)
    g2 = xp.empty((k, n * h * w), dtype=grad.dtype)        # d act/dz * grad, channels first
    K.gemm.channels_first(grad, g2, pre, slopes, activation, slope, alpha)
    grad_x = grad_weight = grad_bias = grad_slopes = None
    if needs[0]:
        grad_cols = xp.matmul(weight.reshape(k, c * 9).T, g2)  # (C*9, K) @ (K, P)
        grad_x = _util.empty((n, c, h, w), grad.dtype, grad)
        K.gemm.col2im(grad_cols, grad_x)
    if needs[1]:
        grad_weight = xp.matmul(g2, cols.T).reshape(k, c, 3, 3)  # (K, P) @ (P, C*9)
    if ctx.has_bias and needs[2]:
        grad_bias = _util.empty((k,), grad.dtype, grad)
        K.reduce.channel_sum(g2.reshape(1, k, -1), grad_bias)
    if activation == "prelu" and needs[3]:
        grad_slopes = K.gemm.prelu_slope_grad(pre, grad, xp)
    return grad_x, grad_weight, grad_bias, grad_slopes


def conv3x3_gemm_plain_forward(ctx, x, weight, bias=None):
    return conv3x3_gemm_forward(ctx, x, weight, bias)


def conv3x3_gemm_plain_backward(ctx, grad):
    return conv3x3_gemm_backward(ctx, grad)[:3]


# batch norm (kernels/batchnorm.py) ------------------------------------------------------

def batchnorm_forward(ctx, x, gamma, beta, running_mean=None, running_var=None, training=True,
                      momentum=0.1, eps=1e-5):
    xp = array_module(x)
    x, gamma, beta = _c(x), _c(gamma), _c(beta)
    c = x.shape[1]
    if training:
        mean = xp.empty((c,), dtype=x.dtype)
        inv_std = xp.empty((c,), dtype=x.dtype)
        # running statistics are updated in place: kernels write contiguous arrays
        rm = rv = None
        if running_mean is not None:
            rm, rv = _c(running_mean), _c(running_var)
        K.bn.statistics(x, mean, inv_std, rm, rv, momentum, eps, xp)
        for given, updated in ((running_mean, rm), (running_var, rv)):
            if given is not None and updated is not given:
                given[...] = updated
    else:
        mean = _c(running_mean).astype(x.dtype, copy=False)
        inv_std = (1 / xp.sqrt(running_var + eps)).astype(x.dtype)
    y = _util.empty_like(x)
    K.bn.normalize(x, mean, inv_std, gamma, beta, y)
    ctx.save_for_backward(x, gamma, mean, inv_std)
    ctx.training = training
    return y


def batchnorm_backward(ctx, grad):
    x, gamma, mean, inv_std = ctx.saved_tensors
    c = x.shape[1]
    needs = tuple(ctx.needs_input_grad) + (True,) * 3
    grad_gamma = _util.empty((c,), x.dtype, x)
    grad_beta = _util.empty((c,), x.dtype, x)
    grad_x = _util.empty_like(x) if needs[0] else None
    K.bn.backward(x, _c(grad), mean, inv_std, gamma, grad_x, grad_gamma, grad_beta, ctx.training, array_module(x))
    return grad_x, (grad_gamma if needs[1] else None), (grad_beta if needs[2] else None)


# pooling ------------------------------------------------------------------------------

def _pooled_shape(x):
    n, c, h, w = x.shape
    return (n, c, h // 2, w // 2)


def maxpool2x2_forward(ctx, x):
    x = _c(x)
    y = _util.empty(_pooled_shape(x), x.dtype, x)
    winner = array_module(x).empty(y.shape, dtype=np.int8)  # fully written by the kernel
    K.pool.maxpool2x2_forward(x, y, winner)
    ctx.save_for_backward(winner)
    ctx.x_shape = x.shape
    return y


def maxpool2x2_backward(ctx, grad):
    (winner,) = ctx.saved_tensors
    grad_x = _util.empty(ctx.x_shape, grad.dtype, grad)
    K.pool.maxpool2x2_backward(_c(grad), winner, grad_x)
    return (grad_x,)


def avgpool2x2_forward(ctx, x):
    x = _c(x)
    y = _util.empty(_pooled_shape(x), x.dtype, x)
    K.pool.avgpool2x2_forward(x, y)
    ctx.x_shape = x.shape
    return y


def avgpool2x2_backward(ctx, grad):
    grad_x = _util.empty(ctx.x_shape, grad.dtype, grad)
    K.pool.avgpool2x2_backward(_c(grad), grad_x)
    return (grad_x,)


# element-wise activations -------------------------------------------------------------

def _unary(forward_kernel, backward_kernel, saves_output=False, param_names=()):
    """forward/backward of a map y = f(x, **params) whose gradient needs x (or y)."""
    def forward(ctx, x, **params):
        x = _c(x)
        y = _util.empty_like(x)
        values = tuple(params[name] for name in param_names)
        getattr(K.act, forward_kernel)(x, y, *values)
        ctx.save_for_backward(y if saves_output else x)
        ctx.values = values
        return y

    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        grad_x = _util.empty_like(saved)
        getattr(K.act, backward_kernel)(saved, _c(grad), grad_x, *ctx.values)
        return (grad_x,)
    return forward, backward


def _with_defaults(forward, **defaults):
    def wrapped(ctx, x, **params):
        return forward(ctx, x, **{**defaults, **params})
    return wrapped


def prelu_forward(ctx, x, weight):
    x, weight = _c(x), _c(weight)
    y = _util.empty_like(x)
    K.act.prelu_forward(x, weight, y)
    ctx.save_for_backward(x, weight)
    return y


def prelu_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = _util.empty_like(x) if ctx.needs_input_grad[0] else None
    grad_weight = _util.empty_like(weight) if ctx.needs_input_grad[1] else None
    K.act.prelu_backward(x, weight, _c(grad), grad_x, grad_weight)
    return grad_x, grad_weight


def rrelu_forward(ctx, x, lower=3.0, upper=8.0, training=False, seed=0):
    x = _c(x)
    y = _util.empty_like(x)
    ctx.params = (lower, upper, training, seed)  # backward draws the slopes again
    K.act.rrelu_forward(x, y, *ctx.params)
    ctx.save_for_backward(x)
    return y


def rrelu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    grad_x = _util.empty_like(x)
    K.act.rrelu_backward(x, _c(grad), grad_x, *ctx.params)
    return (grad_x,)


def maxout_forward(ctx, x, pieces=2):
    x = _c(x)
    out_shape = (x.shape[0], x.shape[1] // pieces) + tuple(x.shape[2:])
    y = _util.empty(out_shape, x.dtype, x)
    winner = array_module(x).empty(out_shape, dtype=np.int32)  # fully written by the kernel
    K.act.maxout_forward(x, y, winner)
    ctx.save_for_backward(winner)
    ctx.x_shape = x.shape
    return y


def maxout_backward(ctx, grad):
    (winner,) = ctx.saved_tensors
    grad_x = _util.empty(ctx.x_shape, grad.dtype, grad)
    K.act.maxout_backward(_c(grad), winner, grad_x)
    return (grad_x,)


# dropout ------------------------------------------------------------------------------

def dropout_forward(ctx, x, p=0.5, training=True, seed=0):
    if not training or p == 0:  # the identity, as the reference
        ctx.mask = None
        return x
    x = _c(x)
    y = _util.empty_like(x)
    K.dropout.dropout_apply(x, y, p, seed)
    ctx.mask = (p, seed)  # the mask is drawn again in backward, never stored
    return y


def dropout_backward(ctx, grad):
    if ctx.mask is None:
        return (grad,)
    grad = _c(grad)
    grad_x = _util.empty_like(grad)
    K.dropout.dropout_apply(grad, grad_x, *ctx.mask)
    return (grad_x,)


# fancy PCA ----------------------------------------------------------------------------

def fancy_pca_forward(ctx, images, eigvecs, eigvals, alphas, scale=None):
    """images (N, 3, H, W) uint8 / float32 / float64 -> float32 / float32 / float64 (see
    pycnn/ops/fancy_pca.py); the kernel works in the output dtype, so uint8 images are
    converted first and offset in place."""
    from pycnn.ops import fancy_pca as spec
    xp = array_module(images)
    dtype = spec.output_dtype(images)
    images = _c(images)
    scaled = xp.asarray(eigvals, dtype=np.float64) * spec.pixel_scale(images, scale)
    ctx.differentiable = images.dtype != np.uint8
    if images.dtype == np.uint8:
        out = images.astype(dtype)
        K.fancy_pca.fancy_pca_apply(out, eigvecs, scaled, alphas, out=out)
    else:
        out = K.fancy_pca.fancy_pca_apply(images, eigvecs, scaled, alphas, out=_util.empty_like(images))
    return out


def fancy_pca_backward(ctx, grad):
    return (grad if ctx.differentiable else None,)  # the identity; uint8 images: no gradient


# ----------------------------------------------------------------------------- loading

def optimiser_kernels():
    """The fused optimiser updates (pycnn.kernels.optim), or None without numba-cuda."""
    registry._load_backend("cuda")
    return K.optim

def load() -> None:
    """Import the kernels and register every cuda implementation (once, on first use)."""
    try:
        K.conv = kernel_module("conv3x3")
        K.gemm = kernel_module("conv_gemm")
        K.bn = kernel_module("batchnorm")
        K.optim = kernel_module("optim")
        K.pool = kernel_module("pool")
        K.act = kernel_module("activations")
        K.dropout = kernel_module("dropout")
        K.reduce = kernel_module("reduce")
        K.fancy_pca = kernel_module("fancy_pca")
    except ImportError as exc:
        warnings.warn(f"pycnn: the cuda backend needs numba-cuda ({exc}); CUDA arrays run on the "
                      "array-generic references instead. Install it with `pip install 'pycnn[cuda]'`.",
                      RuntimeWarning, stacklevel=2)
        return

    def register(name, forward, backward, **kwargs):
        registry.get(name).register("cuda", forward=forward, backward=backward, **kwargs)

    # the first algorithm registered is the backend's 'auto' choice
    register("conv3x3", conv3x3_gemm_plain_forward, conv3x3_gemm_plain_backward, algo="gemm")
    register("conv3x3", conv3x3_forward, conv3x3_backward, algo="direct")
    register("conv3x3_act", conv3x3_gemm_forward, conv3x3_gemm_backward, algo="gemm")
    register("batchnorm", batchnorm_forward, batchnorm_backward)
    register("maxpool2x2", maxpool2x2_forward, maxpool2x2_backward)
    register("avgpool2x2", avgpool2x2_forward, avgpool2x2_backward)
    register("relu", *_unary("relu_forward", "relu_backward"))
    leaky_forward, leaky_backward = _unary("leaky_relu_forward", "leaky_relu_backward", param_names=("slope",))
    register("leaky_relu", _with_defaults(leaky_forward, slope=0.01), leaky_backward)
    register("prelu", prelu_forward, prelu_backward)
    register("rrelu", rrelu_forward, rrelu_backward)
    elu_forward, elu_backward = _unary("elu_forward", "elu_backward", param_names=("alpha",))
    register("elu", _with_defaults(elu_forward, alpha=1.0), elu_backward)
    register("sigmoid", *_unary("sigmoid_forward", "sigmoid_backward"))
    register("tanh", *_unary("tanh_forward", "tanh_backward"))
    register("maxout", maxout_forward, maxout_backward)
    register("dropout", dropout_forward, dropout_backward)
    register("fancy_pca", fancy_pca_forward, fancy_pca_backward)
