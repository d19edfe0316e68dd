"""The ``cuda`` backend: registry implementations on the Numba-CUDA kernels of ``pycnn.kernels``.

``load()`` runs the first time the backend is asked for (``pycnn.ops`` hooks it in with
``registry.add_backend_loader``), so importing pycnn never imports numba.  Each wrapper has
the signature of its reference (``forward(ctx, *inputs, **params)``, ``backward(ctx, grad)``),
allocates outputs with ``_util.empty`` on the inputs' device and launches the kernels on the
current CuPy stream (NumPy arrays under ``NUMBA_ENABLE_CUDASIM=1``).

The wrappers follow the idiom of both compiled backends (pycnn/ops/_backend.py): factories
``_op(K)`` closing over ``K``, the namespace of the kernel modules, and the elementwise family
registered from the specs.  Portable ops (linear, the losses, arithmetic) are registered as
their array-generic reference, which runs on the same device (CuPy); softmax_cross_entropy
has a kernel of its own ('kernel', the auto choice) besides its reference.

``PYCNN_CUDA_CONV`` (read once, when this module is imported) names the algorithm that
``auto`` runs first for conv3x3 and conv3x3_act (``routing.set_default``): how a GPU
benchmark compares whole training steps.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pycnn import device
from pycnn.device import array_module
from pycnn.ops import _backend, _util, activations, conv, fancy_pca, pool, registry, routing
from pycnn.ops._backend import Backend, grad_like, needs_grad
from pycnn.ops.registry import Algo

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
    sys.modules["pycnn"].kernels = package
    return package


def kernel_module(name: str):
    """``pycnn.kernels.<name>`` (imports numba)."""
    kernels_package()
    return importlib.import_module(f"pycnn.kernels.{name}")


# ----------------------------------------------------------------------------- wrappers
# K: the kernel modules (``_kernel_modules``); every factory returns (forward, backward).

def _c(a):
    """An input as the kernels take it (``_util.kernel_array``: the simulator's NumPy arrays
    may be big-endian or unaligned; CuPy arrays only need to be contiguous)."""
    return _util.kernel_array(a)


def _zeros(K, n, like):
    out = _util.empty((n,), like.dtype, like)
    K.reduce.zero(out)
    return out


def _conv3x3_direct(K):
    # x (N, C, H, W), weight (K, C, 3, 3), bias (K,) or None -> y (N, K, H, W) (kernels/conv3x3.py)
    def forward(ctx, x, weight, bias=None):
        n, _, h, w = x.shape
        k = weight.shape[0]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = _util.empty((n, k, h, w), x.dtype, x)
        K.conv.conv3x3_forward(x, weight, bias if bias is not None else _zeros(K, k, x), y)
        return y

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if needs_grad(ctx, 0):
            grad_x = _util.empty_like(x)
            K.conv.conv3x3_grad_x(grad, weight, _zeros(K, x.shape[1], x), grad_x)
        if needs_grad(ctx, 1):
            grad_weight = _util.empty_like(weight)
            K.conv.conv3x3_grad_weight(x, grad, grad_weight)
        if ctx.has_bias and needs_grad(ctx, 2):
            grad_bias = _util.empty((weight.shape[0],), x.dtype, x)
            K.conv.conv3x3_grad_bias(grad, grad_bias)
        return grad_x, grad_weight, grad_bias
    return forward, backward


def _conv3x3_gemm(K, fused: bool, implicit: bool = False, tensor_cores: bool = False):
    """conv3x3 (``fused`` False) or conv3x3_act as im2col + cuBLAS GEMM + an epilogue that
    adds the bias and applies the activation (kernels/conv_gemm.py), or with ``implicit``
    as implicit GEMM (kernels/conv_igemm.py: the same products, no im2col matrix; backward
    keeps x instead of it), its float32 products on TF32 tensor cores with ``tensor_cores``
    (operands rounded to 11 significant bits: kernels/tensor_cores.py states the error).
    What backward keeps follows the activation's spec (``conv.grad_from_output``): y where
    it determines the gradient, else the pre-activation z."""
    def forward(ctx, x, weight, bias=None, prelu_weight=None, activation=None, slope=0.01, alpha=1.0):
        xp = array_module(x)
        n, c, h, w = x.shape
        k = weight.shape[0]
        y = _util.empty((n, k, h, w), x.dtype, x)
        from_y = activation is None or conv.grad_from_output(activation, slope, alpha, prelu_weight)
        z = None if from_y else _util.empty((n, k, h, w), x.dtype, x)
        if implicit:
            K.igemm.forward(x, weight.reshape(k, c * 9), y, bias, prelu_weight, z, activation, slope, alpha,
                            tensor_cores=tensor_cores)
            kept = x                                            # backward gathers its columns again
        else:
            kept = xp.empty((c * 9, n * h * w), dtype=x.dtype)  # the columns, fully written by im2col
            K.gemm.im2col(x, kept)
            y2 = xp.matmul(weight.reshape(k, c * 9), kept)      # (K, C*9) @ (C*9, P) -> (K, P)
            K.gemm.epilogue(y2, bias, prelu_weight, y, z, activation, slope, alpha)
        ctx.save_for_backward(kept if needs_grad(ctx, 1) else None, weight,
                              z if z is not None else (y if activation else None), prelu_weight)
        ctx.saved_is_pre = z is not None
        ctx.shapes, ctx.has_bias, ctx.act = (x.shape, k), bias is not None, (activation, slope, alpha)
        return y

    def backward(ctx, grad):
        kept, weight, saved, slopes = ctx.saved_tensors  # kept: x (implicit) or its columns
        (n, c, h, w), k = ctx.shapes
        activation, slope, alpha = ctx.act
        xp = array_module(grad)
        g2 = xp.empty((k, n * h * w), dtype=grad.dtype)        # d act/dz * grad, channels first
        K.gemm.channels_first(grad, g2, saved, slopes, activation, slope, alpha)
        grad_x = grad_weight = grad_bias = grad_slopes = None
        if needs_grad(ctx, 0):
            grad_x = _util.empty((n, c, h, w), grad.dtype, grad)
            if implicit:
                K.igemm.forward(g2, weight, grad_x, channels_first_input=True, flipped=True,
                                tensor_cores=tensor_cores)
            else:
                grad_cols = xp.matmul(weight.reshape(k, c * 9).T, g2)  # (C*9, K) @ (K, P)
                K.gemm.col2im(grad_cols, grad_x)
        if needs_grad(ctx, 1):
            if implicit:
                grad_weight = _util.empty((k, c, 3, 3), grad.dtype, grad)
                K.igemm.grad_weight(g2, kept, grad_weight, xp, tensor_cores=tensor_cores)
            else:
                grad_weight = xp.matmul(g2, kept.T).reshape(k, c, 3, 3)  # (K, P) @ (P, C*9)
        if ctx.has_bias and needs_grad(ctx, 2):
            grad_bias = _util.empty((k,), grad.dtype, grad)
            K.reduce.channel_sum(g2.reshape(1, k, -1), grad_bias)
        if slopes is not None and needs_grad(ctx, 3):  # a per-channel activation (prelu)
            grad_slopes = K.gemm.prelu_slope_grad(saved, grad, xp)  # sums of g * z (or g * y) where <= 0
            if not ctx.saved_is_pre:
                grad_slopes = grad_slopes / slopes  # y = a z there, a > 0
        return grad_x, grad_weight, grad_bias, grad_slopes

    if fused:
        return forward, backward

    def conv_forward(ctx, x, weight, bias=None):
        return forward(ctx, x, weight, bias)

    def conv_backward(ctx, grad):
        return backward(ctx, grad)[:3]
    return conv_forward, conv_backward


def _batchnorm(K, fused: bool):
    """batchnorm (``fused`` False) or batchnorm_act: x (N, C) or (N, C, H, W); gamma, beta,
    prelu_weight and the statistics (C,) (kernels/batchnorm.py).  Forward: the statistics
    (2 launches), then one pass that normalises and applies the activation; backward keeps x
    only (z is recomputed: no y or z in memory), 2 reduction launches, then grad_x."""
    def forward(ctx, x, gamma, beta, prelu_weight=None, running_mean=None, running_var=None, training=True,
                momentum=0.1, eps=1e-5, activation=None, slope=0.01, alpha=1.0):
        xp = array_module(x)
        c = x.shape[1]
        if training:
            mean = xp.empty((c,), dtype=x.dtype)
            inv_std = xp.empty((c,), dtype=x.dtype)
            # running statistics are updated in place: kernels write contiguous arrays
            rm = rv = None
            if running_mean is not None:
                rm, rv = _c(running_mean), _c(running_var)
            K.bn.stats(x, mean, inv_std, rm, rv, momentum, eps, xp)
            for given, updated in ((running_mean, rm), (running_var, rv)):
                if given is not None and updated is not given:
                    given[...] = updated
        else:
            mean = _c(running_mean).astype(x.dtype, copy=False)
            inv_std = (1 / xp.sqrt(running_var + eps)).astype(x.dtype)
        y = _util.empty_like(x)
        K.bn.apply(x, mean, inv_std, gamma, beta, y, prelu_weight, activation, slope, alpha)
        ctx.save_for_backward(x, gamma, beta, prelu_weight, mean, inv_std)
        ctx.training, ctx.act = training, (activation, slope, alpha)
        return y

    def backward(ctx, grad):
        x, gamma, beta, prelu_weight, mean, inv_std = ctx.saved_tensors
        c = x.shape[1]
        grad_gamma = _util.empty((c,), x.dtype, x)
        grad_beta = _util.empty((c,), x.dtype, x)
        grad_x = _util.empty_like(x) if needs_grad(ctx, 0) else None
        grad_slopes = _util.empty((c,), x.dtype, x) if prelu_weight is not None and needs_grad(ctx, 3) else None
        K.bn.backward(x, grad_like(grad, x), mean, inv_std, gamma, beta, grad_x, grad_gamma, grad_beta, ctx.training,
                      array_module(x), prelu_weight, grad_slopes, *ctx.act)
        grads = (grad_x, grad_gamma if needs_grad(ctx, 1) else None, grad_beta if needs_grad(ctx, 2) else None)
        return grads + (grad_slopes,) if fused else grads

    if fused:
        return forward, backward

    def bn_forward(ctx, x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        return forward(ctx, x, gamma, beta, None, running_mean, running_var, training, momentum, eps)
    return bn_forward, backward


def _softmax_ce(K):
    """logits (N, C), labels (N,) integers on the same device (checked by the kernel, on the
    device: no host synchronisation), class_weight (C,) or None (kernels/loss.py): one launch
    forward, one backward."""
    def forward(ctx, logits, labels=None, label_smoothing=0.0, class_weight=None):
        xp = array_module(logits)
        n, _ = logits.shape
        loss = _util.empty((), logits.dtype, logits)
        lse = xp.empty((n,), dtype=logits.dtype)       # fully written by the kernel
        stats = xp.empty((2,), dtype=logits.dtype)     # W, sum_c w_c
        labels, class_weight = _c(labels), _c(class_weight)  # params are not prepared with the inputs
        K.loss.softmax_ce_forward(logits, labels, class_weight, label_smoothing, loss, lse, stats)
        table = _util.live_table()
        if table is not None:  # a recorded step: each replay checks the labels again, have them read
            table.on_replay(lambda: K.loss.replayed(logits))
        ctx.save_for_backward(logits, lse, stats)
        ctx.params = (labels, class_weight, label_smoothing)
        return loss

    def backward(ctx, grad):
        logits, lse, stats = ctx.saved_tensors
        labels, class_weight, smoothing = ctx.params
        grad_logits = _util.empty_like(logits)
        K.loss.softmax_ce_backward(logits, labels, class_weight, smoothing, lse, stats, grad_like(grad, logits),
                                   grad_logits)
        return (grad_logits,)
    return forward, backward


def _fancy_pca(K):
    """images (N, 3, H, W) uint8 / float32 / float64 -> float32 / float32 / float64 (see
    pycnn/ops/fancy_pca.py); the kernel works in the output dtype, so uint8 images are
    converted first and offset in place."""
    def forward(ctx, images, eigvecs, eigvals, alphas, scale=None):
        xp = array_module(images)
        dtype = fancy_pca.output_dtype(images)
        scaled = xp.asarray(eigvals, dtype=np.float64) * fancy_pca.pixel_scale(images, scale)
        ctx.differentiable = images.dtype != np.uint8
        if images.dtype == np.uint8:
            out = images.astype(dtype)
            K.fancy_pca.fancy_pca_apply(out, eigvecs, scaled, alphas, out=out)
            return out
        return K.fancy_pca.fancy_pca_apply(images, eigvecs, scaled, alphas, out=_util.empty_like(images))

    def backward(ctx, grad):
        return (grad if ctx.differentiable else None,)  # the identity; uint8 images: no gradient
    return forward, backward


def _live_key(seed):
    """(table, index) of the stream key that stands for ``seed`` in a recorded step's live
    table (pycnn.cuda_graph), read on the device at each replay; None otherwise."""
    table = _util.live_table()
    return None if table is None else table.key_of(seed)


def _live_keyed(K):
    """dropout's kernel and rrelu's bindings, reading the stream key of a seed handed out
    while a step is recorded from the live table instead of baking the key into the graph."""
    def dropout_apply(x, y, p, seed):
        K.dropout.dropout_apply(x, y, p, seed, live_key=_live_key(seed))

    def rrelu_forward(x, y, lower, upper, seed, training):
        K.act.rrelu_forward(x, y, lower, upper, seed, training, live_key=_live_key(seed))

    def rrelu_backward(x, grad, grad_x, lower, upper, seed, training):
        K.act.rrelu_backward(x, grad, grad_x, lower, upper, seed, training, live_key=_live_key(seed))
    return dropout_apply, rrelu_forward, rrelu_backward


def _elementwise_bindings(K, rrelu_forward, rrelu_backward):
    """``<op>_forward`` / ``<op>_backward`` of every map in the kernels' activation table, and rrelu's."""
    bindings = {"rrelu_forward": rrelu_forward, "rrelu_backward": rrelu_backward}
    for name in K.act.MAPS:
        bindings[f"{name}_forward"] = functools.partial(K.act.map_forward, name)
        bindings[f"{name}_backward"] = functools.partial(K.act.map_backward, name)
    return SimpleNamespace(**bindings)


# ----------------------------------------------------------- the conv algorithm default

CONV_OPS = ("conv3x3", "conv3x3_act")
_CONV_ENVIRONMENT = os.environ.get("PYCNN_CUDA_CONV")  # read once, here


def conv_default_from_environment(value: str | None, op_name: str, algorithms) -> tuple[str | None, str | None]:
    """(the algorithm ``auto`` runs first for ``op_name``, or None; an error message, or None)
    of the value of PYCNN_CUDA_CONV (unset, empty or 'auto': the backend's own choice)."""
    value = (value or "").strip()
    if value in algorithms:
        return value, None
    wrong = f"PYCNN_CUDA_CONV must be one of {', '.join(algorithms)} for {op_name}, got {value!r}"
    return None, None if value in ("", "auto") else wrong


def apply_conv_environment(value: str | None) -> None:
    """Make ``value`` (of PYCNN_CUDA_CONV) what ``auto`` runs first for conv3x3 and
    conv3x3_act on cuda; an op without that algorithm refuses each call in one line naming
    the variable (a planned conv3x3 + activation then runs unfused)."""
    for name in CONV_OPS:
        algo, error = conv_default_from_environment(value, name, registry.get(name).algorithms("cuda"))
        routing.set_default(name, "cuda", algo)
        routing.register_auto("cuda", name, None if error is None else _refusal(error))


def _refusal(error: str):
    def choose(shapes, params) -> str:
        raise ValueError(error)
    return choose


# ----------------------------------------------------------------------------- loading

_KERNEL_MODULES = {"conv": "conv3x3", "gemm": "conv_gemm", "igemm": "conv_igemm", "bn": "batchnorm",
                   "optim": "optim", "pool": "pool", "act": "activations", "dropout": "dropout", "reduce": "reduce",
                   "fancy_pca": "fancy_pca", "loss": "loss"}
_optim = None


def optimizer_kernels():
    """The fused optimizer updates (pycnn.kernels.optim), or None without numba-cuda."""
    registry.load_backend("cuda")
    return _optim



def load() -> None:
    """Import the kernels and register every cuda implementation (once, on first use)."""
    global _optim
    cuda = Backend("cuda", _c)
    try:
        K = SimpleNamespace(**{key: kernel_module(name) for key, name in _KERNEL_MODULES.items()})
    except ImportError as exc:
        warnings.warn(f"pycnn: the cuda backend needs numba-cuda ({exc}); CUDA arrays run on the "
                      "array-generic references instead. Install it with `pip install 'pycnn[cuda]'`.",
                      RuntimeWarning, stacklevel=2)
        for op in registry.all_ops():  # said in the warning, and in the profile: algorithm 'reference'
            op.register("cuda", op.reference.forward, op.reference.backward, algo=Algo.REFERENCE)
        return
    _optim = K.optim
    dropout_apply, rrelu_forward, rrelu_backward = _live_keyed(K)
    # the first algorithm registered is the backend's 'auto' choice; igemm_tf32 computes
    # float32 on TF32 tensor cores (float64 runs as igemm): only when asked for, as its error
    # is about 1e-3 of sum |w||x|
    for name in CONV_OPS:
        fused = name == "conv3x3_act"
        cuda.register(name, *_conv3x3_gemm(K, fused), algo=Algo.GEMM)
        if not fused:
            cuda.register(name, *_conv3x3_direct(K), algo=Algo.DIRECT)
        cuda.register(name, *_conv3x3_gemm(K, fused, implicit=True), algo=Algo.IGEMM)
        cuda.register(name, *_conv3x3_gemm(K, fused, implicit=True, tensor_cores=True), algo=Algo.IGEMM_TF32)
    if _CONV_ENVIRONMENT is not None and not any(routing.default_algorithm(n, "cuda") for n in CONV_OPS):
        apply_conv_environment(_CONV_ENVIRONMENT)  # a routing.set_default made before wins
    cuda.elementwise(_elementwise_bindings(K, rrelu_forward, rrelu_backward))  # every elementwise op's spec
    cuda.register("prelu", *_backend.prelu_pair(K.act.prelu_forward, K.act.prelu_backward, skips_none=True))
    cuda.register("maxout", *_backend.winner_pair(K.act.maxout_forward, K.act.maxout_backward, np.int32,
                                                  activations.maxout_shape))
    cuda.register("max_pool2x2", *_backend.winner_pair(K.pool.maxpool2x2_forward, K.pool.maxpool2x2_backward,
                                                      np.int8, pool.pooled_shape))
    cuda.register("avg_pool2x2", *_backend.shape_map_pair(K.pool.avgpool2x2_forward, K.pool.avgpool2x2_backward,
                                                         pool.pooled_shape))
    cuda.register("dropout", *_backend.dropout_pair(dropout_apply, dropout_apply))
    cuda.register("batchnorm", *_batchnorm(K, fused=False))
    cuda.register("batchnorm_act", *_batchnorm(K, fused=True), algo=Algo.FUSED)
    # batchnorm_act also as batchnorm, then the activation
    cuda.register("batchnorm_act", *_backend.chain_pair("batchnorm_act"), algo=Algo.CHAIN)
    cuda.register("fancy_pca", *_fancy_pca(K))
    cuda.register("softmax_cross_entropy", *_softmax_ce(K), algo=Algo.KERNEL)
    device.on_host_read(K.loss.raise_label_errors)  # bad labels found on the device are raised there
    cuda.portable()  # linear, the other losses, arithmetic: the reference on CuPy (softmax_cross_entropy's too)
