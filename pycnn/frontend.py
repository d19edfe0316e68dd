"""The front ends of the one-input ops (activations, pooling), made from their specs.

An op whose spec has an ``Api`` (``pycnn.ops.registry``) is offered with no code of its own:

* a function ``<api.function>(x[, weight], *settings)`` in pycnn.functional (Tensors and
  arrays) and pycnn.torch (torch tensors), and its aliases;
* a layer ``<api.layer>(*settings)`` in pycnn.nn and pycnn.torch (``channels`` first where it
  learns a weight per channel), and its aliases; a layer before which a Conv3x3 or a
  BatchNorm can apply the op in its epilogue says so with ``conv_activation`` and
  ``epilogue()``, which ``nn.Sequential`` reads to fuse them;
* where ``api.activation``, a choice of ``pycnn.models.ACTIVATIONS`` and of
  ``pycnn train --activation``.

A setting named ``training`` follows the layer's mode; a ``seed`` of None is drawn from
pycnn's generator at every call in training (0 in evaluation, where nothing is drawn), by the
function or, where the front end draws it itself (``draw_seed=False``), by what it calls.

A front end may give its layers the constructor arguments of another library's twins
(``TorchArgs``: pycnn.torch takes torch.nn's, such as ``MaxPool2(kernel_size=2, stride=2)`` or
``LeakyReLU(negative_slope=0.2, inplace=True)``); a value that means something else than what
the op does is refused in one line naming the argument.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import numpy as np

from pycnn import random as _random
from pycnn.ops import registry

# the settings a layer takes from its mode and its calls, not from its constructor
_PER_CALL = ("training", "seed")


def api_ops() -> list:
    """The ops the front ends offer, in the order they were declared."""
    return [op for op in registry.all_ops() if op.api is not None]


def check_training(training) -> bool:
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    return bool(training)


def check_positive_int(name: str, value) -> int:
    """A layer's count (channels, features, pieces) as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_setting(name: str, value, kind: type):
    """A layer's setting as its type: a real number, a positive integer or a bool."""
    if kind is int:
        return check_positive_int(name, value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        return float(value)
    return check_training(value) if kind is bool else value


# ------------------------------------------------------------------------------ functions

def _signature(op) -> inspect.Signature:
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("x", positional)]
    if op.api.weight is not None:
        params.append(inspect.Parameter("weight", positional))
    params += [inspect.Parameter(name, positional, default=default) for name, default, _ in op.api.settings]
    return inspect.Signature(params)


def make_function(op, apply_op: Callable, draw_seed: bool = True) -> Callable:
    """``op`` as a function of its inputs and settings, run by the front end's ``apply_op``
    (which draws a seed of None itself unless ``draw_seed``)."""
    signature = _signature(op)
    has_weight = op.api.weight is not None
    names = tuple(signature.parameters)
    known = frozenset(names)
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not p.empty}

    def function(*args, **kwargs):
        # the arguments by name, as signature.bind would give them (which is slower per call,
        # so it runs only to raise its TypeError for a call that does not fit)
        params = dict(zip(names, args))
        if kwargs:
            params.update(kwargs)
            if len(params) != len(args) + len(kwargs) or not known.issuperset(kwargs):
                signature.bind(*args, **kwargs)
        if len(args) > len(names):
            signature.bind(*args, **kwargs)
        if len(params) < len(names):
            params = {**defaults, **params}
            if len(params) < len(names):
                signature.bind(*args, **kwargs)
        inputs = [params.pop("x")] + ([params.pop("weight")] if has_weight else [])
        if "training" in params:
            check_training(params["training"])
        if draw_seed and "seed" in params and params["seed"] is None:
            params["seed"] = _random.next_seed() if params.get("training", True) else 0
        return apply_op(op.name, *inputs, **params)

    function.__name__ = function.__qualname__ = op.api.function
    function.__signature__ = signature
    function.__doc__ = op.api.doc
    return function


def functions(apply_op: Callable, module: str, draw_seed: bool = True) -> dict[str, Callable]:
    """Every offered op's function and its aliases, by name, for the namespace ``module``."""
    made = {}
    for op in api_ops():
        function = make_function(op, apply_op, draw_seed)
        function.__module__ = module
        made[op.api.function] = function
        made.update(dict.fromkeys(op.api.function_aliases, function))
    return made


# --------------------------------------------------------------------------------- layers

@dataclasses.dataclass(frozen=True)
class TorchArgs:
    """The constructor arguments of a layer's twin in another library that it takes too:
    ``aliases`` (their name: the layer's), ``fixed`` (an argument: (its default, the values
    that mean what the op does)), ``defaults`` (the layer's argument: its default there),
    ``inplace`` (the argument of that name, kept as an attribute: the result is the same)."""
    aliases: dict = dataclasses.field(default_factory=dict)
    fixed: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    inplace: bool = False

    def parameters(self, kind) -> list:
        params = [inspect.Parameter(name, kind, default=default) for name, (default, _) in self.fixed.items()]
        if self.inplace:
            params.append(inspect.Parameter("inplace", kind, default=False))
        return params + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                         for name in self.aliases]

    def resolve(self, layer: str, values: dict) -> dict:
        """``values`` with the aliases under the layer's names; one line for a fixed
        argument's value that the op cannot honour."""
        for name, (_, accepted) in self.fixed.items():
            value = values.pop(name)
            value = tuple(value) if isinstance(value, list) else value
            if not any(value == a and type(value) is type(a) for a in accepted):
                raise ValueError(f"{layer}: {name}={value!r} is not supported (pycnn's op takes {name} in "
                                 f"{list(accepted)})")
        for alias, name in self.aliases.items():
            value = values.pop(alias)
            if value is not None:  # given: it takes the place of the layer's own argument
                values[name] = value
        return values


@dataclasses.dataclass(frozen=True)
class LayerBase:
    """What a front end's layers are made of: the ``module`` class to derive from; for the
    layers with a weight per channel, ``new_weight(channels, value, dtype, device)`` (a
    parameter filled with ``value``) and the ``default_dtype``; ``device``: whether the
    constructor takes a device (torch); ``torch_args``: the twins' arguments, by op name."""
    module: type
    new_weight: Callable
    default_dtype: object
    device: bool = False
    torch_args: dict = dataclasses.field(default_factory=dict)


def _layer_signature(op, base: LayerBase) -> inspect.Signature:
    positional, keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    torch_args = base.torch_args.get(op.name, TorchArgs())
    params = []
    if op.api.weight is not None:
        initial, default = op.api.weight
        channels = torch_args.defaults.get("channels", inspect.Parameter.empty)
        params += [inspect.Parameter("channels", positional, default=channels),
                   inspect.Parameter(initial, positional, default=default),
                   inspect.Parameter("dtype", positional, default=base.default_dtype)]
        if base.device:
            params.append(inspect.Parameter("device", positional, default=None))
    params += [inspect.Parameter(name, positional if op.api.weight is None else keyword, default=default)
               for name, default, _ in op.api.settings if name not in _PER_CALL]
    params += torch_args.parameters(positional if op.api.weight is None else keyword)
    return inspect.Signature(params)


def make_layer(op, function: Callable, base: LayerBase) -> type:
    """The layer class of ``op``: its settings are attributes, ``forward(x)`` calls ``function``."""
    api = op.api
    signature = _layer_signature(op, base)
    settings = [(name, kind) for name, _, kind in api.settings if name not in _PER_CALL]
    per_call = [name for name, _, _ in api.settings if name == "training"]
    torch_args = base.torch_args.get(op.name)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments) if torch_args is None else torch_args.resolve(api.layer, dict(bound.arguments))
        base.module.__init__(self)
        if "inplace" in values:  # the twin's in-place flag: kept; the result is the same, in a new tensor
            self.inplace = check_setting("inplace", values.pop("inplace"), bool)
        if api.weight is not None:
            channels = check_setting("channels", values["channels"], int)
            initial = check_setting(api.weight[0], values[api.weight[0]], float)
            self.weight = base.new_weight(channels, initial, values["dtype"], values.get("device"))
        for name, kind in settings:
            setattr(self, name, check_setting(name, values[name], kind))

    def forward(self, x):
        inputs = (x, self.weight) if api.weight is not None else (x,)
        params = {name: getattr(self, name) for name, _ in settings}
        params.update({name: self.training for name in per_call})
        return function(*inputs, **params)

    def extra_repr(self):
        shown = [f"{self.weight.shape[0]}"] if api.weight is not None else []
        return ", ".join(shown + [f"{name}={getattr(self, name)}" for name, _ in settings])

    namespace = {"__init__": __init__, "forward": forward, "extra_repr": extra_repr, "__doc__": api.doc,
                 "__signature__": signature, "conv_activation": None}
    if op.conv_epilogue is not None:
        def epilogue(self):
            """(prelu_weight or None, params) of conv3x3_act / batchnorm_act applying this layer."""
            weight = self.weight if api.weight is not None else None
            return weight, {name: getattr(self, name) for name in op.conv_epilogue.params}
        namespace.update(conv_activation=op.name, epilogue=epilogue)
    return type(api.layer, (base.module,), namespace)


def layers(made_functions: dict[str, Callable], base: LayerBase, module: str) -> dict[str, type]:
    """Every offered op's layer and its aliases, by name, for the namespace ``module``."""
    made = {}
    for op in api_ops():
        layer = make_layer(op, made_functions[op.api.function], base)
        layer.__module__ = module
        layer.__qualname__ = op.api.layer
        made[op.api.layer] = layer
        made.update(dict.fromkeys(op.api.layer_aliases, layer))
    return made
