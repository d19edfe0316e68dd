"""Reverse-mode automatic differentiation over NumPy and CuPy arrays.

A ``Tensor`` holds an array, its gradient and the ``Function`` call that made it.  A
``Function`` subclass defines ``forward(ctx, *args)`` on plain arrays and
``backward(ctx, grad_output)`` returning one gradient (or None) per positional argument;
``Function.apply`` wires it into the graph.  Every registry op is one such Function
(``OpFunction``), dispatching to the backend that fits its inputs.

Arrays of other frameworks enter through ``_foreign_array`` (Tensor construction, ``apply_op``,
``Function.apply``; ``pycnn.foreign``): a PyTorch tensor becomes a NumPy array (CPU) or a CuPy
array (CUDA) sharing its memory, another DLPack exporter goes through ``from_dlpack``.  The
profiler (``pycnn.profiler``) records the route of every op call.  The other way, a
Tensor exports its data with ``__array__`` (host data), ``__dlpack__`` and, on the GPU,
``__cuda_array_interface__``.
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

from pycnn import foreign
from pycnn.device import array_module, device_of, is_cuda_array, to_host
from pycnn.ops import registry, routing
from pycnn.profiler import current_profile

_grad_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("pycnn_grad_enabled", default=True)


@contextlib.contextmanager
def no_grad():
    """Run the block without recording a graph (inference, optimizer updates)."""
    token = _grad_enabled.set(False)
    try:
        yield
    finally:
        _grad_enabled.reset(token)


def is_grad_enabled() -> bool:
    return _grad_enabled.get()


def from_dlpack(obj) -> Tensor:
    """A Tensor sharing the memory of ``obj``, any DLPack exporter (a torch tensor, a JAX or
    CuPy array, a NumPy array): host data becomes a NumPy array, CUDA data a CuPy array.
    float32 and float64 are shared; other dtypes are converted to float32 (a copy), as
    ``Tensor`` does."""
    return Tensor(foreign.array_from_dlpack(obj))


def _foreign_array(obj):
    """``obj`` without a copy as a NumPy or CuPy array where it is another framework's array
    (``foreign.foreign_array``); Tensors and everything else as they are."""
    return obj if isinstance(obj, Tensor) else foreign.foreign_array(obj)


def _as_array(data, dtype=None):
    """An array from ``data``: arrays keep their device and float dtype; Python numbers and
    lists become float32 (the default dtype); integer and bool arrays become float32.
    Torch tensors and other DLPack arrays are taken without a copy (``_foreign_array``)."""
    if isinstance(data, Tensor):
        data = data.data
    data = _foreign_array(data)
    if hasattr(data, "__cuda_array_interface__") and not isinstance(data, np.ndarray):
        xp = array_module(data)
        data = xp.asarray(data)
    else:
        xp = np
        data = np.asarray(data)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        return data.astype(dtype, copy=False)
    if data.dtype.kind == "f" and data.dtype.itemsize in (4, 8):
        return data
    if data.dtype.kind in "biuf":
        return data.astype(xp.float32)
    raise TypeError(f"data must be numeric, got dtype {data.dtype}")


class Tensor:
    """An array with a gradient.  ``Tensor(np_or_cupy_array, requires_grad=True)``."""

    __array_priority__ = 1000  # so that ``ndarray * Tensor`` calls Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node: _Node | None = None  # the Function call that produced this tensor

    # ------------------------------------------------------------------ array properties
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    device = property(lambda self: device_of(self.data))
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad})"

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU when it lives there)."""
        return to_host(self.data)

    # ------------------------------------------------------------------------ interop
    def __array__(self, dtype=None, copy=None):
        """``np.asarray(tensor)``: the host data itself (no copy unless ``dtype`` or ``copy``
        asks for one).  CUDA data is never copied to the host implicitly."""
        if is_cuda_array(self.data):
            raise TypeError(f"can't convert a CUDA tensor (shape {self.shape}) to a NumPy array implicitly: "
                            "use tensor.numpy() (or pycnn.device.to_host) to copy it to the host first")
        if copy is False and dtype is not None and np.dtype(dtype) != self.data.dtype:
            raise ValueError(f"a {self.data.dtype} tensor can't be seen as {np.dtype(dtype)} without a copy")
        if copy:
            return np.array(self.data, dtype=dtype, copy=True)
        return np.asarray(self.data, dtype=dtype)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """Export the data (not the gradient) by DLPack: ``torch.from_dlpack(tensor)``,
        ``cupy.from_dlpack(tensor)``, ``np.from_dlpack(tensor)`` share its memory."""
        kwargs = {k: v for k, v in (("stream", stream), ("max_version", max_version), ("dl_device", dl_device),
                                    ("copy", copy)) if v is not None}
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    @property
    def __cuda_array_interface__(self):
        """The CUDA array interface of CUDA data (so Numba, CuPy and torch take the tensor);
        absent (AttributeError, ``hasattr`` is False) for host data."""
        if not is_cuda_array(self.data):
            raise AttributeError("a tensor on the CPU has no __cuda_array_interface__ (use np.asarray(tensor))")
        return self.data.__cuda_array_interface__

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor of one element, got shape {self.shape}")
        return float(self.numpy().reshape(()))

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    # ----------------------------------------------------------------------- autograd
    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a grad needs a scalar, got shape {self.shape}")
            grad = array_module(self.data).ones_like(self.data)
        else:
            grad = _as_array(grad, self.dtype)
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"grad must have shape {self.shape}, got {tuple(grad.shape)}")

        order = _topological_order(self)
        seed = grad
        grads = {id(self): grad}
        given = set()  # the arrays already given to a leaf as its .grad in this pass
        for tensor in order:  # outputs before the inputs they were made from
            g = grads.pop(id(tensor), None)
            if g is None:
                continue
            node = tensor._node
            if node is None:
                if tensor.grad is not None:
                    tensor.grad = tensor.grad + g
                else:  # a .grad of its own: not the caller's array, a view of it, or another leaf's
                    shared = g is seed or id(g) in given or getattr(g, "base", None) is not None
                    tensor.grad = g.copy() if shared else g
                    given.add(id(tensor.grad))
                continue
            if getattr(node.ctx, "freed", False):
                raise RuntimeError(f"backward through {node.function.__name__} a second time: the first backward "
                                   "freed what its forward kept; run the forward again (or keep the loss of one "
                                   "graph for one backward)")
            input_grads = node.function.backward(node.ctx, g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if len(input_grads) != len(node.inputs):
                raise RuntimeError(
                    f"{node.function.__name__}.backward returned {len(input_grads)} gradients "
                    f"for {len(node.inputs)} inputs")
            for parent, pg in zip(node.inputs, input_grads):
                if pg is None or not isinstance(parent, Tensor) or not parent.requires_grad:
                    continue
                if tuple(pg.shape) != parent.shape:
                    raise RuntimeError(
                        f"{node.function.__name__}.backward gave a gradient of shape {tuple(pg.shape)} "
                        f"for an input of shape {parent.shape}")
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            node.ctx.saved_tensors = ()  # free what forward kept once it has been used
            node.ctx.freed = True

    # ---------------------------------------------------------------- operator sugar
    # __add__/__radd__, __sub__/__rsub__, __mul__/__rmul__, __truediv__/__rtruediv__: set below
    def __neg__(self):
        return apply_op("mul", self, -1.0)

    def __pow__(self, exponent):
        return apply_op("pow", self, exponent=exponent)

    def __matmul__(self, other):
        return apply_op("matmul", self, other)

    def sum(self, axis=None, keepdims=False):
        return apply_op("sum", self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return apply_op("mean", self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return apply_op("reshape", self, shape=tuple(shape))

    def flatten(self):
        return apply_op("flatten", self)

    def exp(self):
        return apply_op("exp", self)

    def log(self):
        return apply_op("log", self)

    def abs(self):
        return apply_op("abs", self)


def _binary_operator(op: str, reflected: bool):
    if reflected:
        return lambda self, other: apply_op(op, other, self)
    return lambda self, other: apply_op(op, self, other)


for _op, _name in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "truediv")):
    setattr(Tensor, f"__{_name}__", _binary_operator(_op, reflected=False))
    setattr(Tensor, f"__r{_name}__", _binary_operator(_op, reflected=True))


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from ``root``, each after every tensor that depends on it."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:  # iterative depth-first search: deep graphs do not hit the recursion limit
        tensor, children_done = stack.pop()
        if children_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor._node is not None:
            for parent in tensor._node.inputs:
                if isinstance(parent, Tensor) and parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order[::-1]


class Context:
    """What ``forward`` keeps for ``backward``."""

    def __init__(self, needs_input_grad: tuple):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *arrays) -> None:
        self.saved_tensors = arrays


class _Node:
    __slots__ = ("function", "ctx", "inputs")

    def __init__(self, function, ctx, inputs):
        self.function, self.ctx, self.inputs = function, ctx, inputs


class Function:
    """Subclass with static ``forward(ctx, *args, **kwargs)`` and ``backward(ctx, grad)``;
    call ``YourFunction.apply(*args, **kwargs)``.  Positional Tensor arguments are
    differentiable; keyword arguments are passed through as they are."""

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_output):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs) -> Tensor:
        return _apply(cls, args, kwargs)


def _apply(function, args, kwargs) -> Tensor:
    args = tuple(_foreign_array(a) for a in args)
    arrays = tuple(a.data if isinstance(a, Tensor) else a for a in args)
    needs_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
    record = is_grad_enabled() and any(needs_grad)
    ctx = Context(needs_grad)
    output = function.forward(ctx, *arrays, **kwargs)
    result = Tensor(output)
    if record:
        result.requires_grad = True
        result._node = _Node(function, ctx, args)
    return result


class OpFunction(Function):
    """The autograd Function of a registry op: runs on the route ``pycnn.ops.routing`` gives
    the inputs (or the one planned already); the profiler records that route."""

    op = None  # set on the subclass made for each op

    @classmethod
    def forward(cls, ctx, *inputs, algo="auto", route=None, **params):
        if route is None:
            route = routing.route(cls.op, inputs, params, algo)
        ctx.route = route
        profile = current_profile()
        if profile is None:
            return route.impl.forward(ctx, *inputs, **params)
        start = profile.clock()
        out = route.impl.forward(ctx, *inputs, **params)
        profile.add(cls.op.name, route.backend, route.algo, "forward", profile.clock() - start)
        return out

    @classmethod
    def backward(cls, ctx, grad_output):
        route, profile = ctx.route, current_profile()
        if profile is None:
            return route.impl.backward(ctx, grad_output)
        start = profile.clock()
        grads = route.impl.backward(ctx, grad_output)
        profile.add(cls.op.name, route.backend, route.algo, "backward", profile.clock() - start)
        return grads


_op_functions: dict[str, type] = {}


def op_function(name: str) -> type:
    """The ``OpFunction`` subclass of the registry op ``name``."""
    fn = _op_functions.get(name)
    if fn is None:
        fn = type(f"{name}_function", (OpFunction,), {"op": registry.get(name)})
        _op_functions[name] = fn
    return fn


def apply_op(name: str, *inputs, **params) -> Tensor:
    """Run registry op ``name``: ``inputs`` are differentiable arrays/Tensors (numbers are
    promoted to 0-d arrays of the other inputs' dtype), ``params`` keyword arguments
    (``algo``: an algorithm or 'auto'; ``route``: a route planned already, see nn.Sequential)."""
    op = registry.get(name)
    algo = params.pop("algo", "auto")
    route = params.pop("route", None)
    inputs = _promote_scalars(tuple(_foreign_array(x) for x in inputs))
    params = {key: _foreign_array(value) for key, value in params.items()}
    arrays = tuple(x.data if isinstance(x, Tensor) else x for x in inputs)
    op.check(*arrays, **params)
    return op_function(name).apply(*inputs, algo=algo, route=route, **params)


def _promote_scalars(inputs):
    """Numbers (Python's, and NumPy scalars such as np.float64(2)) become 0-d arrays of the
    first Tensor's or array's dtype and device; alone, a NumPy float scalar keeps its dtype and
    any other number becomes float32."""
    def is_number(x):
        return isinstance(x, (int, float, np.number)) and not isinstance(x, (bool, np.bool_))

    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    if like is None:
        like = next((x for x in inputs if hasattr(x, "dtype") and not isinstance(x, np.generic)), None)
    out = []
    for x in inputs:
        if x is not None and not isinstance(x, Tensor) and (not hasattr(x, "dtype") or isinstance(x, np.generic)):
            if not is_number(x):
                raise TypeError(f"operand must be a Tensor, an array or a number, got {type(x).__name__}")
            if like is not None:
                dtype = like.dtype
            else:
                dtype = x.dtype if isinstance(x, np.floating) else np.float32
            module = array_module(like.data if isinstance(like, Tensor) else like) if like is not None else np
            x = module.asarray(x, dtype=dtype)
        out.append(x)
    return tuple(out)
