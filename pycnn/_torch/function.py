"""Any registry op on torch tensors, eagerly: ``apply_op(name, *tensors, **params)`` through a
``torch.autograd.Function`` made once per op by ``function(name)``.

This is the path for every op of the registry (losses, elementwise arithmetic, reshapes,
dropout, fancy PCA): its forward hands the tensors' memory to the op's checks and the
implementation the registry resolves, and wraps the result back without copying; an output
that lives inside an input (dropout in evaluation, reshape) comes back as a torch view of it.
The layers' ops (convolution, batch norm, activations, pooling) also have a ``torch.library``
registration (``pycnn._torch.library``) that torch.compile, export and fx can see; that one
cannot return views of its inputs, which is why this path remains for the others.

* ``ctx.needs_input_grad`` reaches the op's backward: gradients nobody asked for are not computed.
* The tensors an op keeps for its backward are saved with ``ctx.save_for_backward``, so an
  in-place change to one of them before ``backward`` raises, as with torch's own ops.
* Gradients that share memory are copied, so torch's gradient accumulation never adds into
  two ``.grad`` at once.
* Backward is not itself differentiable (``once_differentiable``): no double backward.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

import pycnn.ops  # noqa: F401 (declares every op)
from pycnn._torch.bridge import aliases, array, device_context, output, same_view, saved_arrays, tensor, timed
from pycnn.autograd import Context
from pycnn.ops import registry

# ------------------------------------------------------------------------ the Function factory

_functions: dict[str, type] = {}


def function(name: str) -> type:
    """The ``torch.autograd.Function`` of registry op ``name``, made once.  Call it as
    ``function(name).apply(algo, params, *inputs)``: ``algo`` the algorithm ('auto'), ``params``
    a dict of the op's keyword parameters (torch tensors among them, such as labels or running
    statistics, are passed as arrays sharing their memory), ``inputs`` the differentiable
    torch tensors (None where the op takes an optional input)."""
    fn = _functions.get(name)
    if fn is not None:
        return fn
    op = registry.get(name)

    def forward(ctx, algo, params, *inputs):
        with device_context(inputs):
            arrays = tuple(array(t) for t in inputs)
            kwargs = {k: array(v) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
            op.check(*arrays, **kwargs)
            backend, algorithm, impl = op.resolve(arrays, kwargs, algo)
            op_ctx = Context(tuple(ctx.needs_input_grad[2:]))
            out = timed(op.name, backend, algorithm, "forward", impl.forward, op_ctx, *arrays, **kwargs)
            result = output(out, arrays, inputs)
        ctx.op_ctx, ctx.impl, ctx.backend, ctx.algo = op_ctx, impl, backend, algorithm
        # save what backward reads, so torch raises if it is changed in place before then
        saved = saved_arrays(op_ctx)
        keep = [t for t, a in zip(inputs, arrays) if t is not None and any(aliases(a, s) for s in saved)]
        if any(aliases(out, s) for s in saved):
            keep.append(result)
        ctx.save_for_backward(*keep)
        return result

    @once_differentiable
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018 (torch's check that nothing saved was changed in place)
        needs = ctx.needs_input_grad[2:]
        with device_context((grad,)):
            g = array(grad)
            grads = timed(op.name, ctx.backend, ctx.algo, "backward", ctx.impl.backward, ctx.op_ctx, g)
            if not isinstance(grads, tuple):
                grads = (grads,)
            if len(grads) < len(needs) and not any(needs[len(grads):]):
                grads = grads + (None,) * (len(needs) - len(grads))  # settings passed by position
            if len(grads) != len(needs):
                raise RuntimeError(f"{op.name}: only its first {len(grads)} inputs are differentiable; "
                                   "pass the others as keywords or without requires_grad")
            result, taken = [], [g]
            for gi, need in zip(grads, needs):
                if gi is None or not need:
                    result.append(None)
                    continue
                if same_view(gi, g):
                    result.append(grad)  # the incoming gradient itself: torch copes with sharing it
                elif any(aliases(gi, other) for other in taken):
                    result.append(tensor(gi.copy()))  # never two gradients in one piece of memory
                else:
                    result.append(tensor(gi))
                taken.append(gi)
        return (None, None, *result)

    title = "".join(part.capitalize() for part in name.split("_"))
    fn = type(f"{title}Function", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward), "op": op,
               "__doc__": f"pycnn's registry op {name!r} as a torch.autograd.Function."})
    _functions[name] = fn
    return fn


def apply_op(name: str, *inputs, algo: str = "auto", **params) -> torch.Tensor:
    """Run registry op ``name`` on torch tensors, recorded by torch's autograd: ``inputs``
    are the op's differentiable inputs (numbers and NumPy arrays become tensors like the
    first tensor input), ``params`` its keyword parameters."""
    like = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    converted = []
    for x in inputs:
        if x is not None and not isinstance(x, torch.Tensor):
            if isinstance(x, bool) or not isinstance(x, (int, float, np.number, np.ndarray)):
                raise TypeError(f"{name}: inputs must be torch tensors, NumPy arrays or numbers, "
                                f"got {type(x).__name__}")
            x = torch.as_tensor(x, dtype=None if like is None or isinstance(x, np.ndarray) else like.dtype,
                                device=None if like is None else like.device)
        converted.append(x)
    return function(name).apply(algo, params, *converted)


