"""Layers: modules hold parameters and buffers and call the functional ops.

    net = nn.Sequential(nn.Conv3x3(3, 32), nn.BatchNorm(32), nn.ReLU(), nn.MaxPool2(),
                        nn.Flatten(), nn.Linear(32 * 16 * 16, 10))
    logits = net(x)                 # x: (N, 3, 32, 32)
    net.eval()                      # batch norm, dropout and rrelu switch to evaluation
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

import pycnn.functional as F
from pycnn import frontend
from pycnn import initializers as init
from pycnn.autograd import Tensor, apply_op
from pycnn.device import array_module, to_device
from pycnn.ops import registry, routing


class Parameter(Tensor):
    """A Tensor that a Module learns (requires_grad is on)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    """Base class: parameters, buffers (state that is saved but not learned, such as batch
    norm's running statistics) and child modules are found by attribute assignment."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if name in self._parameters and isinstance(value, Tensor) and not isinstance(value, Parameter):
            raise TypeError(f"{name} is a parameter of {type(self).__name__}: assign a pycnn.nn.Parameter (or "
                            f"to {name}.data), not a Tensor, which the optimizer and checkpoints would not see")
        if name in self._buffers and value is not None and not isinstance(value, (Module, Tensor)):
            self.register_buffer(name, value)  # a new array for a buffer stays a buffer (saved, moved)
            return
        home = self._parameters if isinstance(value, Parameter) else self._modules if isinstance(value, Module) \
            else None
        for table in (self._parameters, self._buffers, self._modules):
            if table is not home:
                table.pop(name, None)
        if home is not None:
            home[name] = value  # a replacement keeps its place (parameter order is state order)
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array) -> None:
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "", _seen=None):
        """Every module once, by the name of its first place (a layer used twice is one
        layer)."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def named_parameters(self):
        """Every parameter once (tied weights: one parameter, updated once per step)."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), b

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # --------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> Module:
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    # --------------------------------------------------------------------------- state
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Every parameter and buffer by dotted name, as host (NumPy) arrays."""
        state = OrderedDict((name, Tensor(p.data).numpy().copy()) for name, p in self.named_parameters())
        for name, b in self.named_buffers():
            state[name] = Tensor(b).numpy().copy()
        return state

    def load_state_dict(self, state) -> None:
        """Copy arrays into the parameters and buffers (on their device); names and shapes
        must match exactly."""
        own = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        expected = set(own) | set(buffers)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
        checked = []  # all of it checked before anything is written: a bad key changes nothing
        for name, value in state.items():
            target = own[name].data if name in own else buffers[name]
            value = Tensor(value).numpy() if isinstance(value, Tensor) else to_device(value, "cpu")
            value = np.asarray(value)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state[{name!r}] has shape {value.shape}, the model expects {tuple(target.shape)}")
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state[{name!r}] must hold real numbers, got {value.dtype}")
            checked.append((target, value))
        for target, value in checked:
            target[...] = array_module(target).asarray(value, dtype=target.dtype)

    def to(self, device: str) -> Module:
        """Move parameters and buffers to ``device``: 'cpu' (NumPy) or 'cuda' (CuPy)."""
        for p in self.parameters():
            p.data = to_device(p.data, device)
            p.grad = None
        for _, module in self.named_modules():
            for name, b in list(module._buffers.items()):
                module.register_buffer(name, to_device(b, device))
        return self

    # ---------------------------------------------------------------------------- repr
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        lines.append(f")  # {self.num_parameters():,} parameters")
        return "\n".join(lines)


class Sequential(Module):
    """Layers applied in order.  A Conv3x3 or a BatchNorm directly followed by an activation
    that conv3x3_act / batchnorm_act apply (ReLU, LeakyReLU, PReLU, ELU, ...: the layers with
    ``conv_activation``) runs as one fused call (the activation is applied where the output
    is stored) when the backend that would run the first layer runs the fused op on these
    inputs (``routing.plan_fused``, asked once per pair); the result is that of the two layers.
    ``fuse=False`` (or setting ``.fuse``) runs every layer on its own."""

    def __init__(self, *layers: Module, fuse: bool = True):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"layer {i} must be a Module, got {type(layer).__name__}")
            setattr(self, str(i), layer)
        self.fuse = fuse

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def forward(self, x):
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            layer = layers[i]
            planned = _plan_fusion(layer, layers[i + 1], x) if self.fuse and i + 1 < len(layers) else None
            if planned is not None:
                x = _fused(layer, layers[i + 1], x, planned)
                i += 2
                continue
            x = layer(x)
            i += 1
        return x


def _fusion(layer, act, x):
    """(fused op, its inputs, params, algo) of ``act(layer(x))``, or None: a Conv3x3 or a
    BatchNorm followed by a layer with ``conv_activation`` (whose PReLU has one slope per
    channel; otherwise the unfused path reports the mismatch)."""
    if type(layer) not in (Conv3x3, BatchNorm) or getattr(act, "conv_activation", None) is None:
        return None
    channels = layer.out_channels if type(layer) is Conv3x3 else layer.weight.shape[0]
    if getattr(act, "weight", None) is not None and act.weight.shape != (channels,):
        return None  # a prelu with another slope count than the channels: the unfused path says so
    prelu_weight, params = act.epilogue()
    params = {"activation": act.conv_activation, **params}
    if type(layer) is Conv3x3:
        return "conv3x3_act", (x, layer.weight, layer.bias, prelu_weight), params, layer.algo
    return "batchnorm_act", (x, layer.weight, layer.bias, prelu_weight), {**layer.batch_norm_params(), **params}, "auto"


def _plan_fusion(layer, act, x):
    """The route of ``act(layer(x))`` as one fused call, or None (``_fusion``; and the backend
    that runs the layer on x must run the fused op on these inputs, so a fused call never
    moves to a slower backend)."""
    fusion = _fusion(layer, act, x)
    if fusion is None:
        return None
    op, inputs, params, algo = fusion
    arrays = tuple(None if a is None else (a.data if isinstance(a, Tensor) else a) for a in inputs)
    return routing.plan_fused(registry.get(op), arrays, params, algo)


def _fused(layer, act, x, route):
    """act(layer(x)) in one fused call on the planned route."""
    op, inputs, params, algo = _fusion(layer, act, x)
    return apply_op(op, *inputs, algo=algo, route=route, **params)


# --------------------------------------------------------------------------------- layers

class Conv3x3(Module):
    """3x3 convolution, stride 1, padding 1: (N, in_channels, H, W) -> (N, out_channels, H, W).
    He initialisation by default (the right scale in front of a rectifier)."""
    initialised_by_scheme = True  # initializers.apply re-draws its weight

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, init_scheme: str = "he",
                 algo: str = "auto", dtype=np.float32, rng=None):
        super().__init__()
        self.in_channels = frontend.check_positive_int("in_channels", in_channels)
        self.out_channels = frontend.check_positive_int("out_channels", out_channels)
        self.algo = algo
        shape = (out_channels, in_channels, 3, 3)
        self.weight = Parameter(init.initialise(init_scheme, shape, dtype=dtype, rng=rng))
        self.bias = Parameter(np.zeros(out_channels, dtype)) if bias else None

    def forward(self, x):
        return F.conv3x3(x, self.weight, self.bias, algo=self.algo)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}"


class Linear(Module):
    """(N, in_features) -> (N, out_features); weight is (out_features, in_features)."""
    initialised_by_scheme = True  # initializers.apply re-draws its weight

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_scheme: str = "he",
                 dtype=np.float32, rng=None):
        super().__init__()
        self.in_features = frontend.check_positive_int("in_features", in_features)
        self.out_features = frontend.check_positive_int("out_features", out_features)
        self.weight = Parameter(init.initialise(init_scheme, (out_features, in_features), dtype=dtype, rng=rng))
        self.bias = Parameter(np.zeros(out_features, dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Flatten(Module):
    def forward(self, x):
        return F.flatten(x)


def _new_weight(channels, value, dtype, device):
    return Parameter(np.full(channels, value, init.float_dtype(dtype)))


# the layers of the activations and poolings (ReLU, LeakyReLU, MaxPool2, ...), made from their specs
globals().update(frontend.layers(vars(F), frontend.LayerBase(Module, _new_weight, np.float32), __name__))


class BatchNorm(Module):
    """Batch normalisation over (N, C) or (N, C, H, W) with learned scale and shift and
    running statistics for evaluation."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        channels = frontend.check_positive_int("channels", channels)
        dtype = init.float_dtype(dtype)
        self.momentum, self.eps = momentum, eps
        self.weight = Parameter(np.ones(channels, dtype))
        self.bias = Parameter(np.zeros(channels, dtype))
        self.register_buffer("running_mean", np.zeros(channels, dtype))
        self.register_buffer("running_var", np.ones(channels, dtype))

    def batch_norm_params(self) -> dict:
        return {"running_mean": self.running_mean, "running_var": self.running_var, "training": self.training,
                "momentum": self.momentum, "eps": self.eps}

    def forward(self, x):
        return F.batch_norm(x, self.weight, self.bias, **self.batch_norm_params())

    def extra_repr(self):
        return f"{self.weight.shape[0]}, momentum={self.momentum}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout: in training zero each element with probability p and scale the rest
    by 1/(1-p); the identity in evaluation."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training)

    def extra_repr(self):
        return f"p={self.p}"
