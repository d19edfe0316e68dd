"""The layers' ops as ``torch.library`` operators (namespace ``pycnn``), so that torch's
compilers and tracers see them: ``torch.compile(fullgraph=True)``, ``torch.export``,
``torch.fx.symbolic_trace``, ``torch.jit.trace`` and meta-device forwards.

Every registry op that a layer runs (conv3x3, conv3x3_act, batchnorm, batchnorm_act, and the
ops with an ``Api``: the activations and the 2x2 poolings) is one operator

    torch.ops.pycnn.<op>(*tensors, *settings) -> (y, handle)

with three parts, registered by ``_declare``:

* the real implementation runs the registry op on the tensors' memory (the C++ kernels on the
  CPU, the CUDA ones on CUDA tensors) and keeps the op's context for its backward in the
  memory of ``handle``, an int64 scalar tensor: the context lives exactly as long as torch keeps
  the handle (saved for backward by autograd, or by a compiled graph);
* the fake implementation gives y's shape, dtype and layout without computing (torch.compile,
  export and meta tensors run it);
* the autograd formula saves the handle and calls one more operator,
  ``torch.ops.pycnn.backward(grad, handle, inputs, needs)``, which runs the op's backward from
  the kept context (its fake: gradients shaped as the inputs).

What the real implementation does beyond the registry op:
* an empty batch (N = 0) gives an empty y, and zero gradients;
* bfloat16 / float16 tensors (CPU autocast) are computed in float32 and y cast back;
* a channels_last x gives a channels_last y (pycnn's kernels read NCHW: x is copied);
* a per-channel weight of one element (torch's PReLU(num_parameters=1)) is shared by every
  channel, its gradient summed;
* rrelu's ``seed`` of None is drawn from pycnn's generator at each call (inside the operator,
  so a compiled graph draws afresh too).
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import numpy as np
import torch

import pycnn.ops  # noqa: F401 (declares every op)
from pycnn import frontend
from pycnn import random as _random
from pycnn._torch.bridge import aliases, array, device_context, same_view, tensor, timed
from pycnn.autograd import Context
from pycnn.ops import registry
from pycnn.ops.pool import pooled_shape

NAMESPACE = "pycnn"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How registry op ``name`` is offered as an operator: its tensor arguments (x first; the
    differentiable ones, then ``mutated`` ones such as running statistics, which the operator
    leaves alone and returns updated after y and the handle: torch's autograd takes only
    functional operators), its settings as (name, schema type, default), the ``shape`` of y
    given x's shape and the tensors, and which tensors hold one value per channel of x
    (``per_channel``)."""
    name: str
    tensors: tuple            # (name, optional) of the differentiable tensor arguments
    settings: tuple = ()      # (name, schema type, default)
    mutated: tuple = ()       # optional tensors the registry op updates in place: their new values are outputs
    shape: Callable = lambda x_shape, tensors, settings: tuple(x_shape)
    per_channel: tuple = ()   # tensors with one value per channel of x (one value: shared by all)


def _conv_shape(x_shape, tensors, settings):
    """(N, C, H, W) * (K, C, 3, 3) -> (N, K, H, W)"""
    n, _, h, w = x_shape
    return (n, tensors["weight"].shape[0], h, w)


def _maxout_shape(x_shape, tensors, settings):
    """(N, C*k, ...) -> (N, C, ...)"""
    return (x_shape[0], x_shape[1] // settings["pieces"], *x_shape[2:])


_ACT = (("activation", "str", "relu"), ("slope", "float", 0.01), ("alpha", "float", 1.0))
_BN = (("training", "bool", True), ("momentum", "float", 0.1), ("eps", "float", 1e-5))
_SCHEMA_TYPES = {float: "float", int: "int", bool: "bool"}
_SHAPES = {"max_pool2x2": lambda x_shape, t, s: pooled_shape(x_shape),
           "avg_pool2x2": lambda x_shape, t, s: pooled_shape(x_shape), "maxout": _maxout_shape}


def _api_spec(op) -> OpSpec:
    """An activation's or a pooling's operator, from its spec's Api (a seed may be None: drawn)."""
    tensors = (("x", False),) + ((("weight", False),) if op.api.weight is not None else ())
    settings = tuple((name, _SCHEMA_TYPES[kind] + ("?" if default is None else ""), default)
                     for name, default, kind in op.api.settings)
    return OpSpec(op.name, tensors, settings, shape=_SHAPES.get(op.name, OpSpec.shape),
                  per_channel=("weight",) if op.api.weight is not None else ())


SPECS = {spec.name: spec for spec in [
    OpSpec("conv3x3", (("x", False), ("weight", False), ("bias", True)), (("algo", "str", "auto"),),
           shape=_conv_shape),
    OpSpec("conv3x3_act", (("x", False), ("weight", False), ("bias", True), ("prelu_weight", True)),
           _ACT + (("algo", "str", "auto"),), shape=_conv_shape, per_channel=("prelu_weight",)),
    OpSpec("batchnorm", (("x", False), ("gamma", True), ("beta", True)), _BN,
           mutated=("running_mean", "running_var")),
    OpSpec("batchnorm_act", (("x", False), ("gamma", True), ("beta", True), ("prelu_weight", True)), _BN + _ACT,
           mutated=("running_mean", "running_var"), per_channel=("prelu_weight",)),
    *(_api_spec(op) for op in frontend.api_ops()),
]}


def _schema(spec: OpSpec) -> str:
    """'(Tensor x, Tensor weight, Tensor? bias, str algo="auto") -> (Tensor, Tensor)', and a
    Tensor more in and out for each mutated one."""
    args = [f"Tensor{'?' if optional else ''} {name}" for name, optional in spec.tensors]
    args += [f"Tensor? {name}" for name in spec.mutated]
    args += [f"{kind} {name}={_default(value)}" for name, kind, value in spec.settings]
    return f"({', '.join(args)}) -> ({', '.join(['Tensor'] * (2 + len(spec.mutated)))})"


def _default(value) -> str:
    return "None" if value is None else f'"{value}"' if isinstance(value, str) else repr(value)


# ------------------------------------------------------------------ the kept contexts


class _Kept(bytearray):
    """The 8 bytes behind a handle tensor (its number), holding what backward needs: torch
    frees it with the handle, and the context with it."""


_kept: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_count = iter(range(1, 2 ** 62))


def _keep(state) -> torch.Tensor:
    """A new int64 scalar tensor whose memory holds ``state`` (found again by ``_kept_state``)."""
    number = next(_count)
    memory = _Kept(8)
    memory.state = state
    value = np.ndarray((), np.int64, buffer=memory)
    value[...] = number
    _kept[number] = memory
    return torch.from_numpy(value)


def _kept_state(handle: torch.Tensor):
    """What ``_keep`` stored behind ``handle``; None for the handle of an empty batch."""
    memory = _kept.get(int(handle))
    return None if memory is None else memory.state


def _no_handle() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


@dataclasses.dataclass
class _State:
    op: object
    impl: object
    backend: str
    algo: str
    ctx: Context
    compute: object   # the dtype the op ran in (the gradients are cast back to their inputs')


# ------------------------------------------------------------------ layout and dtype


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out so (and not also contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty(shape, like: torch.Tensor, layout_of: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format(layout_of)
                       if len(shape) == 4 else torch.contiguous_format)


def _compute_dtype(x: torch.Tensor):
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _in(t, dtype):
    """A tensor in the dtype the op runs in (low-precision ones in float32)."""
    return t.to(dtype) if t is not None and t.dtype in _LOW_PRECISION else t


# ------------------------------------------------------------------------ forward


def _bind(spec: OpSpec, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """The operator's arguments as (tensors, mutated, settings) by name (torch's dispatcher
    may leave out the ones at their defaults)."""
    names = [n for n, _ in spec.tensors] + list(spec.mutated) + [n for n, _, _ in spec.settings]
    values = dict(zip(names, args), **kwargs)
    tensors = {n: values.get(n) for n, _ in spec.tensors}
    mutated = {n: values.get(n) for n in spec.mutated}
    return tensors, mutated, {n: values.get(n, default) for n, _, default in spec.settings}


def _fake_forward(spec: OpSpec):
    def fake(*args, **kwargs):
        tensors, mutated, settings = _bind(spec, args, kwargs)
        x = tensors["x"]
        return (_empty(spec.shape(tuple(x.shape), tensors, settings), x, x), torch.empty((), dtype=torch.int64),
                *_updated(mutated))
    return fake


def _updated(mutated: dict) -> tuple:
    """New tensors for the values of the mutated ones (empty for None)."""
    return tuple(torch.empty(0) if t is None else t.clone() for t in mutated.values())


def _real_forward(spec: OpSpec):
    op = registry.get(spec.name)

    def forward(*args, **kwargs):
        tensors, mutated, settings = _bind(spec, args, kwargs)
        x = tensors["x"]
        shape = spec.shape(tuple(x.shape), tensors, settings)
        updated = _updated(mutated)  # the registry op updates these copies in place
        if x.shape[0] == 0:
            return _empty(shape, x, x), _no_handle(), *updated
        compute = _compute_dtype(x)
        inputs = {name: _in(t, compute) for name, t in tensors.items()}
        for name in spec.per_channel:
            if inputs[name] is not None and inputs[name].numel() == 1 < x.shape[1]:
                inputs[name] = inputs[name].expand(x.shape[1])  # one slope for every channel
        algo = settings.pop("algo", "auto")
        if settings.get("seed", 0) is None:
            settings["seed"] = _random.next_seed() if settings.get("training", True) else 0
        if spec.name.startswith("batchnorm"):  # torch's affine=False: no scale, no shift
            c = x.shape[1]
            if inputs["gamma"] is None:
                inputs["gamma"] = torch.ones(c, dtype=compute, device=x.device)
            if inputs["beta"] is None:
                inputs["beta"] = torch.zeros(c, dtype=compute, device=x.device)
        with device_context((x,)):
            arrays = [array(t) for t in inputs.values()]
            params = dict(settings, **{name: None if t is None else array(new)
                                       for (name, t), new in zip(mutated.items(), updated)})
            op.check(*arrays, **params)
            backend, algorithm, impl = op.resolve(arrays, params, algo)
            ctx = Context((True,) * len(arrays))
            out = timed(op.name, backend, algorithm, "forward", impl.forward, ctx, *arrays, **params)
            y = tensor(out.copy() if any(aliases(out, a) for a in arrays) else out)
        y = y.to(x.dtype).contiguous(memory_format=memory_format(x))
        return y, _keep(_State(op, impl, backend, algorithm, ctx, compute)), *updated
    return forward


# ----------------------------------------------------------------------- backward


def _fake_backward(grad, handle, inputs, needs):
    return [_empty(t.shape, t, t) if need else grad.new_empty(0) for t, need in zip(inputs, needs)]


def _real_backward(grad, handle, inputs, needs):
    """The gradients of the op's differentiable ``inputs`` (None for an absent one), empty
    where not ``needs``."""
    state = _kept_state(handle)
    if state is None:  # an empty batch
        return [torch.zeros_like(t) if need else grad.new_empty(0) for t, need in zip(inputs, needs)]
    ctx = state.ctx
    full_needs = list(needs) + [False] * (len(ctx.needs_input_grad) - len(needs))
    ctx.needs_input_grad = tuple(full_needs)
    with device_context((grad,)):
        g = array(_in(grad, state.compute))
        grads = timed(state.op.name, state.backend, state.algo, "backward", state.impl.backward, ctx, g)
        grads = grads if isinstance(grads, tuple) else (grads,)
        grads += (None,) * (len(inputs) - len(grads))
        result, taken = [], [g]
        for gi, t, need in zip(grads, inputs, needs):
            if gi is None or not need:
                result.append(grad.new_empty(0))
                continue
            shared = same_view(gi, g) or any(aliases(gi, other) for other in taken)  # one gradient per memory
            taken.append(gi)
            gt = tensor(gi.copy() if shared else gi)
            if gt.shape != t.shape:
                gt = gt.sum_to_size(t.shape)  # a value shared by every channel
            result.append(gt.to(t.dtype).contiguous(memory_format=memory_format(t) if t.dim() == 4
                                                    else torch.contiguous_format))
    return result


# ------------------------------------------------------------------------ autograd


def _autograd(spec: OpSpec):
    """setup_context and backward of ``spec``'s operator: save the handle and the present
    differentiable inputs; backward calls the backward operator."""
    count = len(spec.tensors)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(output[1], *inputs[:count])

    def backward(ctx, grad, _grad_handle, *_grad_updated):
        if torch.is_grad_enabled():  # backward(create_graph=True): the gradient would be a constant
            raise RuntimeError(f"pycnn's {spec.name} has no double backward: its backward is not differentiable")
        handle, *saved = ctx.saved_tensors
        needs = [t is not None and bool(ctx.needs_input_grad[i]) for i, t in enumerate(saved)]
        result = [None] * (count + len(spec.mutated) + len(spec.settings))
        if any(needs):
            grads = torch.ops.pycnn.backward(grad, handle, saved, needs)
            result[:count] = [g if need else None for g, need in zip(grads, needs)]
        return tuple(result)
    return setup_context, backward


def _declare(spec: OpSpec) -> None:
    qualname = f"{NAMESPACE}::{spec.name}"
    torch.library.define(qualname, _schema(spec), lib=_LIBRARY)
    torch.library.impl(qualname, "CompositeExplicitAutograd", _real_forward(spec), lib=_LIBRARY)
    torch.library.register_fake(qualname, _fake_forward(spec), lib=_LIBRARY)
    setup_context, backward = _autograd(spec)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIBRARY)


torch.library.define(f"{NAMESPACE}::backward",
                     "(Tensor grad, Tensor handle, Tensor?[] inputs, bool[] needs) -> Tensor[]", lib=_LIBRARY)
torch.library.impl(f"{NAMESPACE}::backward", "CompositeExplicitAutograd", _real_backward, lib=_LIBRARY)
torch.library.register_fake(f"{NAMESPACE}::backward", _fake_backward, lib=_LIBRARY)
for _spec in SPECS.values():
    _declare(_spec)


# ------------------------------------------------------------------------ calling them


def call(name: str, *args, **kwargs) -> torch.Tensor:
    """y of operator ``name`` (``torch.ops.pycnn.<name>``); arguments as its schema."""
    return getattr(torch.ops.pycnn, name)(*args, **kwargs)[0]
