"""pycnn's ops and layers inside PyTorch: ``torch.autograd.Function``s and ``torch.nn.Module``s.

    import torch, pycnn.torch as pt
    net = torch.nn.Sequential(pt.Conv3x3(3, 16), torch.nn.BatchNorm2d(16), pt.ReLU(), pt.MaxPool2(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 10))
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()                     # pycnn's backward kernels fill the .grad of its layers

Every registry op is a ``torch.autograd.Function`` made by one factory, ``function(name)``:
its forward converts the torch tensors to arrays without copying (CPU: ``tensor.numpy()``;
CUDA: ``cupy.from_dlpack``), runs the op's argument checks and the implementation the
registry resolves for them (the C++ kernels for CPU tensors, the Numba-CUDA kernels for
CUDA tensors, on torch's current stream), and wraps the result back without copying
(``torch.from_numpy`` / ``torch.from_dlpack``); its backward does the same with the op's
backward.  A new op in the registry is usable here with no new code:
``pycnn.torch.apply_op("name", *tensors, **params)``.

* ``ctx.needs_input_grad`` reaches the op's backward: gradients nobody asked for are not computed.
* The tensors an op keeps for its backward are saved with ``ctx.save_for_backward``, so an
  in-place change to one of them before ``backward`` raises, as with torch's own ops.
* An output that shares memory with an input (dropout in evaluation, reshape) is returned as
  a torch view of that input; gradients that share memory are copied, so torch's gradient
  accumulation never adds into two ``.grad`` at once.
* Backward is not itself differentiable (``once_differentiable``): no double backward.
* Random ops (``RReLU``, ``Dropout``) draw a seed per call from pycnn's generator
  (``pycnn.manual_seed``), as ``pycnn.nn`` does; the draws are the same on every backend.
* The layers take the initialisation of ``pycnn.nn`` (He for convolutions) from pycnn's
  generator, in float32 unless ``dtype=torch.float64``.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.autograd.function import once_differentiable

import pycnn.ops  # noqa: F401 (declares every op)
from pycnn import frontend
from pycnn import initializers as init
from pycnn import random as _random
from pycnn.autograd import Context
from pycnn.foreign import from_torch
from pycnn.profiler import current_profile
from pycnn.ops import registry
from pycnn.ops.conv import CONV_ACTIVATIONS


# ------------------------------------------------------------------------ arrays and tensors


def _array(tensor):
    """A torch tensor's data as a NumPy (CPU) or CuPy (CUDA) array, sharing its memory."""
    return None if tensor is None else from_torch(tensor)


def _tensor(a) -> torch.Tensor:
    """A NumPy or CuPy array as a torch tensor sharing its memory (a copy only where torch
    cannot hold the layout: negative strides, read-only or misaligned memory)."""
    if hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    a = np.asarray(a)
    if not (a.flags.writeable and a.flags.aligned and a.dtype.isnative) or any(s < 0 for s in a.strides):
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
    return torch.from_numpy(a)


def _ptr(a) -> int:
    """The address of a NumPy or CuPy array's first element."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr


def _aliases(a, b) -> bool:
    """Whether arrays ``a`` and ``b`` (NumPy or CuPy; anything else never does) may share memory."""
    if a is b:
        return a is not None
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.may_share_memory(a, b)
    if isinstance(b, np.ndarray) or not hasattr(a, "__cuda_array_interface__") \
            or not hasattr(b, "__cuda_array_interface__"):
        return False  # one on the host, one on the GPU, or not an array
    import cupy
    return cupy.may_share_memory(a, b)


def _same_view(a, b) -> bool:
    return (a is b) or (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
                        and _aliases(a, b) and _ptr(a) == _ptr(b))


def _view_of(tensor, array, out):
    """``out``, an array inside the memory of ``tensor`` (whose data is ``array``), as a torch
    view of ``tensor`` (so torch knows they alias); None where torch cannot express it."""
    itemsize = out.dtype.itemsize
    if out.dtype != array.dtype or any(s < 0 or s % itemsize for s in out.strides):
        return None
    delta = _ptr(out) - tensor.data_ptr()
    if delta % itemsize:
        return None
    return torch.as_strided(tensor, tuple(out.shape), tuple(s // itemsize for s in out.strides),
                            tensor.storage_offset() + delta // itemsize)


def _output(out, arrays, inputs) -> torch.Tensor:
    """The forward's result as a torch tensor: a view of the input it lives in, if any."""
    if not hasattr(out, "__cuda_array_interface__"):
        out = np.asarray(out)
    for a, t in zip(arrays, inputs):
        if _aliases(out, a):
            view = _view_of(t, a, out)
            return view if view is not None else _tensor(out.copy())
    return _tensor(out)


def _saved_arrays(ctx) -> list:
    """The arrays an implementation kept on its context for backward (saved_tensors, array
    attributes, and the contexts of the parts of a composed op, one level down)."""
    found = []
    for value in (ctx.saved_tensors, *vars(ctx).values()):
        parts = value if isinstance(value, (tuple, list)) else (value,)
        for part in parts:
            if hasattr(part, "saved_tensors"):
                found.extend(x for x in part.saved_tensors if hasattr(x, "dtype"))
            elif hasattr(part, "dtype") and hasattr(part, "shape"):
                found.append(part)
    return found


def _device_context(tensors):
    """Run pycnn on the device of ``tensors``: for CUDA tensors, that device and torch's
    current stream as CuPy's current stream (the Numba kernels launch on it); nothing on the CPU."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    return _cuda_stream(device)


@contextlib.contextmanager
def _cuda_stream(device):
    try:
        import cupy
    except ImportError as exc:
        raise TypeError("pycnn on CUDA torch tensors needs CuPy: pip install 'pycnn[cuda]'") from exc
    index = device.index if device.index is not None else torch.cuda.current_device()
    current = torch.cuda.current_stream(device)
    if current.cuda_stream == 0:  # torch's default: the legacy default stream
        stream = cupy.cuda.Stream.null
    elif hasattr(cupy.cuda.Stream, "from_external") and hasattr(current, "__cuda_stream__"):
        stream = cupy.cuda.Stream.from_external(current)  # CuPy 14: the CUDA stream protocol
    else:
        stream = cupy.cuda.ExternalStream(current.cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        yield


def _timed(name, backend, algo, phase, call, *args, **kwargs):
    """``call(*args, **kwargs)``, recorded in ``pycnn.profile()`` when one is open."""
    profile = current_profile()
    if profile is None:
        return call(*args, **kwargs)
    start = profile.clock()
    out = call(*args, **kwargs)
    profile.add(name, backend, algo, phase, profile.clock() - start)
    return out


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
        with _device_context(inputs):
            arrays = tuple(_array(t) for t in inputs)
            kwargs = {k: _array(v) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
            op.check(*arrays, **kwargs)
            backend, algorithm, impl = op.resolve(arrays, kwargs, algo)
            op_ctx = Context(tuple(ctx.needs_input_grad[2:]))
            out = _timed(op.name, backend, algorithm, "forward", impl.forward, op_ctx, *arrays, **kwargs)
            result = _output(out, arrays, inputs)
        ctx.op_ctx, ctx.impl, ctx.backend, ctx.algo = op_ctx, impl, backend, algorithm
        # save what backward reads, so torch raises if it is changed in place before then
        saved = _saved_arrays(op_ctx)
        keep = [t for t, a in zip(inputs, arrays) if t is not None and any(_aliases(a, s) for s in saved)]
        if any(_aliases(out, s) for s in saved):
            keep.append(result)
        ctx.save_for_backward(*keep)
        return result

    @once_differentiable
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018 (torch's check that nothing saved was changed in place)
        needs = ctx.needs_input_grad[2:]
        with _device_context((grad,)):
            g = _array(grad)
            grads = _timed(op.name, ctx.backend, ctx.algo, "backward", ctx.impl.backward, ctx.op_ctx, g)
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
                if _same_view(gi, g):
                    result.append(grad)  # the incoming gradient itself: torch copes with sharing it
                elif any(_aliases(gi, other) for other in taken):
                    result.append(_tensor(gi.copy()))  # never two gradients in one piece of memory
                else:
                    result.append(_tensor(gi))
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


# ---------------------------------------------------------------------------- the functions
# The same names and arguments as pycnn.functional, on torch tensors.

def conv3x3(x, weight, bias=None, algo: str = "auto") -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1: (N, C, H, W) * (K, C, 3, 3) -> (N, K, H, W)."""
    return apply_op("conv3x3", x, weight, bias, algo=algo)


def conv3x3_act(x, weight, bias=None, prelu_weight=None, activation: str = "relu", slope: float = 0.01,
                alpha: float = 1.0, algo: str = "auto") -> torch.Tensor:
    """act(conv3x3(x, weight, bias)) in one pass, for the activations of
    ``pycnn.ops.conv.CONV_ACTIVATIONS`` (slope: leaky_relu's, alpha: elu's, prelu_weight (K,):
    prelu's)."""
    return apply_op("conv3x3_act", x, weight, bias, prelu_weight, algo=algo, activation=activation,
                    slope=slope, alpha=alpha)


def dropout(x, p: float = 0.5, training: bool = True, seed: int | None = None) -> torch.Tensor:
    """Inverted dropout (a new seed from pycnn's generator per call unless ``seed`` is given)."""
    if seed is None:
        seed = _random.next_seed() if training else 0
    return apply_op("dropout", x, p=p, training=training, seed=seed)


def linear(x, weight, bias=None) -> torch.Tensor:
    """(N, F) @ (O, F)^T + (O,) -> (N, O)."""
    return apply_op("linear", x, weight, bias)


# ------------------------------------------------------------------------------- the layers

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _numpy_dtype(dtype):
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}") from None


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _parameter(array, device) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(array)).to(device))


class Conv3x3(torch.nn.Module):
    """3x3 convolution, stride 1, padding 1: (N, in_channels, H, W) -> (N, out_channels, H, W),
    on pycnn's kernels.  Parameters ``weight`` (out, in, 3, 3) and ``bias`` (out,), named and
    shaped as torch.nn.Conv2d's; He initialisation (``init_scheme``) from pycnn's generator
    or ``rng``, zero bias, as pycnn.nn.Conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, init_scheme: str = "he",
                 algo: str = "auto", dtype=torch.float32, device=None, rng=None):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.algo = algo
        np_dtype = _numpy_dtype(dtype)
        shape = (self.out_channels, self.in_channels, 3, 3)
        self.weight = _parameter(init.initialise(init_scheme, shape, dtype=np_dtype, rng=rng), device)
        if bias:
            self.bias = _parameter(np.zeros(self.out_channels, np_dtype), device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return conv3x3(x, self.weight, self.bias, algo=self.algo)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}, algo={self.algo!r}"


class Conv3x3Act(Conv3x3):
    """A Conv3x3 and its activation in one fused call (``conv3x3_act``): activation 'relu',
    'leaky_relu' (``slope``), 'prelu' (a learned ``prelu_weight`` per output channel,
    initially ``initial_slope``) or 'elu' (``alpha``).  Same result as the two layers."""

    def __init__(self, in_channels: int, out_channels: int, activation: str = "relu", slope: float = 0.01,
                 alpha: float = 1.0, initial_slope: float = 0.25, bias: bool = True, init_scheme: str = "he",
                 algo: str = "auto", dtype=torch.float32, device=None, rng=None):
        if activation not in CONV_ACTIVATIONS:
            raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
        super().__init__(in_channels, out_channels, bias=bias, init_scheme=init_scheme, algo=algo, dtype=dtype,
                         device=device, rng=rng)
        self.activation, self.slope, self.alpha = activation, float(slope), float(alpha)
        if activation == "prelu":
            self.prelu_weight = _parameter(np.full(self.out_channels, initial_slope, _numpy_dtype(dtype)), device)
        else:
            self.register_parameter("prelu_weight", None)

    def forward(self, x):
        return conv3x3_act(x, self.weight, self.bias, self.prelu_weight, activation=self.activation,
                           slope=self.slope, alpha=self.alpha, algo=self.algo)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


def _new_weight(channels, value, dtype, device) -> torch.nn.Parameter:
    return _parameter(np.full(channels, value, _numpy_dtype(dtype)), device)


# the functions and layers of the activations and poolings (relu, ReLU, max_pool2x2, MaxPool2, ...),
# made from their specs by pycnn.frontend
_FUNCTIONS = frontend.functions(apply_op, __name__)
_LAYERS = frontend.layers(_FUNCTIONS, frontend.LayerBase(torch.nn.Module, _new_weight, torch.float32, device=True),
                          __name__)
globals().update(_FUNCTIONS)
globals().update(_LAYERS)


class Dropout(torch.nn.Module):
    """Inverted dropout in training (``module.training``; a seed per call from pycnn's
    generator), the identity in evaluation."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x):
        return dropout(x, self.p, training=self.training)

    def extra_repr(self):
        return f"p={self.p}"


__all__ = ["Conv3x3", "Conv3x3Act", "Dropout", "apply_op", "conv3x3", "conv3x3_act", "dropout", "function", "linear",
           *_FUNCTIONS, *_LAYERS]
