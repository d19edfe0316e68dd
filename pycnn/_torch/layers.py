"""pycnn.torch's functions and layers: torch.nn.Modules on pycnn's operators
(``pycnn._torch.library``), with the constructor signatures of their torch twins.

* ``Conv3x3`` is a ``torch.nn.Conv2d`` (isinstance, init loops, fusers and FLOP counters see
  one) restricted to what conv3x3 computes: kernel_size=3, stride=1, padding=1 or 'same',
  dilation=1, groups=1, padding_mode='zeros'; any other value is refused in one line naming
  the argument.  Its parameters start as torch's (``reset_parameters``: torch's generator and
  default dtype); ``init_scheme="he"`` draws pycnn's He initialisation from pycnn's generator
  (or ``rng``) instead, as pycnn.nn.Conv3x3.
* ``BatchNorm2d`` is a ``torch.nn.BatchNorm2d`` on pycnn's batchnorm op (affine, momentum=None
  and track_running_stats as torch's); ``BatchNormAct2d`` applies an activation in the same
  call (batchnorm_act).
* The activations and poolings (``ReLU``, ``LeakyReLU``, ``MaxPool2``, ...) are made from
  their specs by pycnn.frontend and take their torch twin's arguments too (``inplace``,
  ``negative_slope``, ``PReLU(num_parameters, init)``, ``MaxPool2(kernel_size=2, stride=2)``).
"""
from __future__ import annotations

import numpy as np
import torch

from pycnn import frontend
from pycnn import initializers as init
from pycnn import random as _random
from pycnn._torch import function as generic
from pycnn._torch import library
from pycnn.ops.conv import CONV_ACTIVATIONS

_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------- functions
# The same names and arguments as pycnn.functional, on torch tensors.

def conv3x3(x, weight, bias=None, algo: str = "auto") -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1: (N, C, H, W) * (K, C, 3, 3) -> (N, K, H, W)."""
    return library.call("conv3x3", x, weight, bias, algo)


def conv3x3_act(x, weight, bias=None, prelu_weight=None, activation: str = "relu", slope: float = 0.01,
                alpha: float = 1.0, algo: str = "auto") -> torch.Tensor:
    """act(conv3x3(x, weight, bias)) in one pass, for the activations of
    ``pycnn.ops.conv.CONV_ACTIVATIONS`` (slope: leaky_relu's, alpha: elu's, prelu_weight (K,):
    prelu's)."""
    return library.call("conv3x3_act", x, weight, bias, prelu_weight, activation, slope, alpha, algo)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, activation: str | None = None, prelu_weight=None, slope: float = 0.01,
               alpha: float = 1.0) -> torch.Tensor:
    """torch.nn.functional.batch_norm's arguments, (N, C, H, W) or (N, C) -> the same shape; the
    running statistics (C,) are updated in place in training; weight / bias None: no scale or
    shift.  ``activation`` (one of CONV_ACTIVATIONS) is applied in the same call."""
    if activation is None:
        out = torch.ops.pycnn.batchnorm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    else:
        out = torch.ops.pycnn.batchnorm_act(x, weight, bias, prelu_weight, running_mean, running_var, training,
                                            momentum, eps, activation, slope, alpha)
    y, _, new_mean, new_var = out
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


def dropout(x, p: float = 0.5, training: bool = True, seed: int | None = None) -> torch.Tensor:
    """Inverted dropout (a new seed from pycnn's generator per call unless ``seed`` is given)."""
    if seed is None:
        seed = _random.next_seed() if training else 0
    return generic.apply_op("dropout", x, p=p, training=training, seed=seed)


def linear(x, weight, bias=None) -> torch.Tensor:
    """(N, F) @ (O, F)^T + (O,) -> (N, O)."""
    return generic.apply_op("linear", x, weight, bias)


def _apply(name: str, *inputs, **params) -> torch.Tensor:
    """The generated functions' runner: the op's operator (a seed of None drawn inside it)."""
    return library.call(name, *inputs, **params)


# the functions of the activations and poolings (relu, leaky_relu, max_pool2x2, ...)
FUNCTIONS = frontend.functions(_apply, "pycnn.torch", draw_seed=False)


# ------------------------------------------------------------------------------- the conv

def _require(layer: str, name: str, value, accepted: tuple):
    """``value`` if it is one of ``accepted`` (a list read as a tuple); else one line naming it."""
    value = tuple(value) if isinstance(value, list) else value
    if not any(value == a and type(value) is type(a) for a in accepted):
        raise ValueError(f"{layer}: {name}={value!r} is not supported (pycnn's conv3x3 takes {name} in "
                         f"{list(accepted)})")
    return value


def _float_dtype(dtype):
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


class Conv3x3(torch.nn.Conv2d):
    """3x3 convolution, stride 1, padding 1: (N, in_channels, H, W) -> (N, out_channels, H, W),
    on pycnn's kernels; a torch.nn.Conv2d (parameters ``weight`` (out, in, 3, 3), ``bias`` (out,)).
    ``algo``: conv3x3's algorithm ('auto': pycnn's choice; 'direct': torch's float32 error).
    ``init_scheme``: None for torch's initialisation, or a pycnn.initializers scheme ('he')
    drawn from pycnn's generator or ``rng``, with a zero bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 algo: str = "auto", init_scheme: str | None = None, rng=None):
        name = type(self).__name__
        _require(name, "kernel_size", kernel_size, (3, (3, 3)))
        _require(name, "stride", stride, (1, (1, 1)))
        _require(name, "padding", padding, (1, (1, 1), "same"))
        _require(name, "dilation", dilation, (1, (1, 1)))
        _require(name, "groups", groups, (1,))
        _require(name, "padding_mode", padding_mode, ("zeros",))
        in_channels = frontend.check_positive_int("in_channels", in_channels)
        out_channels = frontend.check_positive_int("out_channels", out_channels)
        super().__init__(in_channels, out_channels, 3, padding=padding, bias=bias, device=device,
                         dtype=_float_dtype(dtype))
        self.algo = algo
        if init_scheme is not None:
            self._initialise(init_scheme, rng)

    def _initialise(self, scheme: str, rng) -> None:
        np_dtype = np.float32 if self.weight.dtype == torch.float32 else np.float64
        drawn = init.initialise(scheme, tuple(self.weight.shape), dtype=np_dtype, rng=rng)
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(drawn))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x):
        return conv3x3(x, self.weight, self.bias, algo=self.algo)

    def _apply(self, fn, recurse=True):
        """After .to(), .double(), .to(memory_format=channels_last): the weight stays (K, C, 3, 3)
        in row-major order, the layout pycnn's kernels read (no copy per call)."""
        super()._apply(fn, recurse)
        if not self.weight.is_contiguous():
            self.weight.data = self.weight.data.contiguous()
        return self

    def extra_repr(self):
        return f"{super().extra_repr()}, algo={self.algo!r}"


class Conv3x3Act(Conv3x3):
    """A Conv3x3 and its activation in one fused call (``conv3x3_act``): activation 'relu',
    'leaky_relu' (``slope``), 'prelu' (a learned ``prelu_weight`` per output channel,
    initially ``initial_slope``), 'elu' (``alpha``), or another of CONV_ACTIVATIONS.  Same result
    as the two layers.
    Made by accelerate from a Conv2d and the PReLU after it, it reads that module's weight
    (``set_activation``) and has no prelu_weight of its own."""

    def __init__(self, in_channels: int, out_channels: int, activation: str = "relu", slope: float = 0.01,
                 alpha: float = 1.0, initial_slope: float = 0.25, **conv_args):
        super().__init__(in_channels, out_channels, **conv_args)
        self.set_activation(activation, slope, alpha)
        if activation == "prelu":
            self.prelu_weight = torch.nn.Parameter(torch.full((self.out_channels,), float(initial_slope),
                                                              dtype=self.weight.dtype, device=self.weight.device))

    def set_activation(self, activation: str, slope: float = 0.01, alpha: float = 1.0, prelu=None) -> None:
        _set_activation(self, activation, slope, alpha, prelu)
        self.register_parameter("prelu_weight", None)

    def forward(self, x):
        prelu_weight = self.prelu_weight if self._prelu is None else self._prelu.weight
        return conv3x3_act(x, self.weight, self.bias, prelu_weight, activation=self.activation,
                           slope=self.slope, alpha=self.alpha, algo=self.algo)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


def _set_activation(module, activation: str, slope: float, alpha: float, prelu) -> None:
    """The activation a fused layer applies; ``prelu``: the module holding PReLU's weight."""
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    module.activation, module.slope, module.alpha = activation, float(slope), float(alpha)
    module.__dict__["_prelu"] = prelu  # not a submodule: its parameter stays where it is in the state_dict


# -------------------------------------------------------------------------- batch norm

class BatchNorm2d(torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on pycnn's batchnorm op: the same arguments, parameters, buffers
    and semantics (training / evaluation, affine=False, track_running_stats=False, momentum=None
    for the cumulative average; torch.fx, which traces into this module where torch's own is a
    leaf, counts num_batches_tracked once at trace time, which only momentum=None reads)."""

    def _batch_norm_args(self, x) -> dict:
        """torch's _BatchNorm.forward, up to the call: which statistics, and the momentum."""
        if isinstance(x, torch.Tensor):  # (an fx Proxy is not: torch.fx traces this module)
            self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return dict(running_mean=self.running_mean if keep_running else None,
                    running_var=self.running_var if keep_running else None, weight=self.weight, bias=self.bias,
                    training=use_batch_stats, momentum=factor, eps=self.eps)

    def forward(self, x):
        return batch_norm(x, **self._batch_norm_args(x))


class BatchNormAct2d(BatchNorm2d):
    """A BatchNorm2d and the activation after it in one call (batchnorm_act): ``activation``
    one of CONV_ACTIVATIONS, with ``slope`` / ``alpha``; for 'prelu', ``prelu`` is the PReLU
    module whose weight it reads (that module keeps the parameter); the other arguments are
    torch.nn.BatchNorm2d's."""

    def __init__(self, num_features: int, activation: str = "relu", slope: float = 0.01, alpha: float = 1.0,
                 prelu=None, **batch_norm_args):
        super().__init__(num_features, **batch_norm_args)
        self.set_activation(activation, slope, alpha, prelu)

    def set_activation(self, activation: str, slope: float = 0.01, alpha: float = 1.0, prelu=None) -> None:
        _set_activation(self, activation, slope, alpha, prelu)

    def forward(self, x):
        prelu_weight = None if self._prelu is None else self._prelu.weight
        return batch_norm(x, **self._batch_norm_args(x), activation=self.activation, prelu_weight=prelu_weight,
                          slope=self.slope, alpha=self.alpha)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


class Dropout(torch.nn.Module):
    """Inverted dropout in training (``module.training``; a seed per call from pycnn's
    generator), the identity in evaluation (x itself, as torch's).  ``inplace`` as torch's
    argument: the result is the same, in a new tensor."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p, self.inplace = float(p), bool(inplace)

    def forward(self, x):
        return dropout(x, self.p, training=True) if self.training else x

    def extra_repr(self):
        return f"p={self.p}"


# --------------------------------------------------------- the activations and poolings

def _new_weight(channels, value, dtype, device) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full((channels,), value, dtype=_float_dtype(dtype), device=device))


_POOL = {"kernel_size": (2, (2, (2, 2))), "stride": (None, (None, 2, (2, 2))), "padding": (0, (0, (0, 0)))}
# the arguments of each layer's torch twin: from the op's spec (Api.torch_settings, torch_inplace),
# and prelu's and the poolings' own
TORCH_ARGS = {op.name: frontend.TorchArgs(aliases={twin: name for name, twin in op.api.torch_settings.items()},
                                          inplace=op.api.torch_inplace) for op in frontend.api_ops()}
TORCH_ARGS |= {
    "prelu": frontend.TorchArgs(aliases={"num_parameters": "channels", "init": "initial_slope"},
                                defaults={"channels": 1}),
    "max_pool2x2": frontend.TorchArgs(fixed={**_POOL, "dilation": (1, (1, (1, 1))), "return_indices": (False, (False,)),
                                            "ceil_mode": (False, (False,))}),
    "avg_pool2x2": frontend.TorchArgs(fixed={**_POOL, "ceil_mode": (False, (False,)),
                                            "count_include_pad": (True, (True, False)),  # no padding: the same
                                            "divisor_override": (None, (None,))}),
}
LAYERS = frontend.layers(FUNCTIONS, frontend.LayerBase(torch.nn.Module, _new_weight, None, device=True,
                                                       torch_args=TORCH_ARGS), "pycnn.torch")
