"""``accelerate(model)``: run an existing torch model's layers on pycnn's kernels.

It walks the model and swaps, in place, every module that one of pycnn's ops computes exactly:

    torch.nn module                                     runs as
    Conv2d 3x3, stride 1, padding 1 / 'same',           Conv3x3 (the same object: its class changes)
      dilation 1, groups 1, padding_mode 'zeros'
    BatchNorm2d                                         BatchNorm2d (the same object)
    such a Conv2d or a BatchNorm2d, then an             Conv3x3Act (conv3x3_act) or BatchNormAct2d
      activation of the conv epilogues in a Sequential    (batchnorm_act): one call; the activation's
      (no hooks on either, used once)                      place holds a FusedActivation
    every activation whose spec names its torch twin    pycnn.torch's layer of the same settings
      (Api.torch_layer: ReLU, LeakyReLU, PReLU, ...)
    MaxPool2d / AvgPool2d, kernel 2, stride 2,          MaxPool2 / AvgPool2
      padding 0, no ceil_mode or dilation

and leaves everything else as it is (the report says why).  Speed: today an accelerated
torchvision model is slower than torch (small maps with wide channels and batch 1 are slow
in pycnn's conv; README, bench/accelerate.py): measure before adopting it.  What a user holds stays valid:
the Parameters and buffers are the same objects under the same state_dict keys (an optimizer
made before keeps working), and the hooks, pre-hooks and train/eval mode of every swapped
module go with it.  torch's RReLU is left: pycnn's rrelu draws a slope 1/U(lower, upper) per
element, torch's U(lower, upper).  Batch norm is not folded into the convolution in evaluation.
"""
from __future__ import annotations

import collections
import copy
import dataclasses

import torch

from pycnn import frontend
from pycnn._torch.layers import LAYERS, BatchNorm2d, BatchNormAct2d, Conv3x3, Conv3x3Act

# precision -> conv3x3's algorithm
PRECISIONS = {"default": "auto", "high": "direct"}

_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_RUN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# the ops whose spec names the torch.nn class they compute exactly: torch class -> op
_TWINS = {getattr(torch.nn, op.api.torch_layer): op for op in frontend.api_ops() if op.api.torch_layer}


def _settings(op, module) -> dict:
    """The op's settings read off the torch module (``Api.torch_settings`` names them there)."""
    return {name: getattr(module, op.api.torch_settings.get(name, name)) for name, _, _ in op.api.settings
            if name not in ("training", "seed")}


def _twin_layer(op):
    """torch module -> the pycnn.torch layer of ``op`` with its settings (a PReLU: its slope count,
    dtype and device; the Parameter itself is moved over by the caller)."""
    layer = LAYERS[op.api.layer]
    if op.api.weight is not None:
        return lambda m: layer(m.num_parameters, dtype=m.weight.dtype, device=m.weight.device)
    if op.api.torch_inplace:
        return lambda m: layer(**_settings(op, m), inplace=m.inplace)
    return lambda m: layer(**_settings(op, m))


# the activations batchnorm_act / conv3x3_act apply: torch class -> (op name, its settings from the module)
_EPILOGUES = {cls: (op.name, lambda m, op=op: _settings(op, m)) for cls, op in _TWINS.items() if op.conv_epilogue}
# the modules swapped one for one: torch class -> the pycnn.torch layer made from the module
_ACTIVATIONS = {cls: _twin_layer(op) for cls, op in _TWINS.items()}
_ACTIVATIONS |= {torch.nn.MaxPool2d: lambda m: LAYERS["MaxPool2"](), torch.nn.AvgPool2d: lambda m: LAYERS["AvgPool2"]()}


@dataclasses.dataclass
class Row:
    path: str      # the module's name in the model ('layer1.0.conv1')
    module: str    # its torch class
    action: str    # 'swapped', 'fused' or 'left'
    detail: str    # what it runs as, or why it was left


@dataclasses.dataclass
class Report:
    """What ``accelerate`` did to each module; ``str(report)`` is a table."""
    precision: str
    rows: list = dataclasses.field(default_factory=list)

    def add(self, path, module, action, detail) -> None:
        self.rows.append(Row(path or "(model)", type(module).__name__, action, detail))

    @property
    def swapped(self) -> list:
        return [r for r in self.rows if r.action != "left"]

    @property
    def left(self) -> list:
        return [r for r in self.rows if r.action == "left"]

    def __str__(self) -> str:
        header = ("module", "torch class", "action", "detail")
        table = [header] + [(r.path, r.module, r.action, r.detail) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in table]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"{len(self.swapped)} swapped (precision {self.precision!r}), {len(self.left)} left")
        return "\n".join(lines)


def accelerate(model: torch.nn.Module, precision: str = "default", inplace: bool = True,
               verbose: bool = False) -> tuple[torch.nn.Module, Report]:
    """Swap ``model``'s modules for pycnn's where pycnn computes the same thing (module
    docstring); returns ``(model, report)``.  ``inplace=False`` works on a deep copy (whose
    Parameters are new objects).  ``verbose`` prints the report.

    ``precision``: 'default' lets conv3x3 choose its algorithm per shape (Winograd where it is
    faster), 'high' runs the direct convolution, whose float32 error is torch's.  Measured on a
    resnet-like stack (bench/torch_embed.py --float32-error: eleven 3x3 convs of 32-128 channels
    at 32x32-8x8, BN, ReLU, residual sums, batch 16, training mode; seeds 0-4), the largest
    error of the float32 logits over the largest float64 logit is 1.3e-6 to 2.6e-6 for
    'default', 4.4e-7 to 8.5e-7 for 'high' and 3.2e-7 to 5.5e-7 for torch itself (at most 1.6x
    torch's).  float64 models equal torch's to about 1e-14 with either precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"accelerate takes a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = Report(precision)
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    if not _swap_root(model, PRECISIONS[precision], report):
        _walk(model, "", _Walk(PRECISIONS[precision], report, uses))
    if verbose:
        print(report)
    return model, report


@dataclasses.dataclass
class _Walk:
    algo: str                  # conv3x3's algorithm
    report: Report
    uses: collections.Counter  # id(module) -> the number of places it is used in the model
    seen: set = dataclasses.field(default_factory=set)
    replaced: dict = dataclasses.field(default_factory=dict)  # id(torch module) -> its pycnn module


def _walk(parent: torch.nn.Module, prefix: str, walk: _Walk) -> None:
    """Swap ``parent``'s children (every place, a module used twice included), then theirs."""
    children = [(name, child) for name, child in parent._modules.items() if child is not None]
    fused = set()
    for i, (name, child) in enumerate(children):
        path = f"{prefix}{name}"
        if id(child) in walk.replaced:  # a module used in several places: the same swap in each
            setattr(parent, name, walk.replaced[id(child)])
        if name in fused or id(child) in walk.seen:
            continue
        walk.seen.add(id(child))
        if isinstance(parent, torch.nn.Sequential) and i + 1 < len(children) and walk.uses[id(child)] == 1:
            next_name, follower = children[i + 1]
            if _fuse(parent, child, next_name, follower, prefix, name, walk):
                fused.add(next_name)
                continue
        if _swap_child(parent, name, child, path, walk.algo, walk.report):
            if getattr(parent, name) is not child:
                walk.replaced[id(child)] = getattr(parent, name)
            continue
        if next(child.children(), None) is None:
            walk.report.add(path, child, "left", "no pycnn op for it")
        else:
            _walk(child, f"{path}.", walk)


def _swap_root(model, algo, report) -> bool:
    """A model that is itself one swappable module (a bare Conv2d) is swapped in place."""
    if type(model) is torch.nn.Conv2d:
        return _swap_conv(model, "", algo, report)
    if type(model) is torch.nn.BatchNorm2d:
        return _swap_bn(model, "", report)
    return False


def _swap_child(parent, name, child, path, algo, report) -> bool:
    """Swap ``child`` (``parent``'s attribute ``name``) if pycnn runs it; whether it did (or
    says why it left it)."""
    kind = type(child)
    if isinstance(child, (Conv3x3, BatchNorm2d, FusedActivation)) or kind in LAYERS.values():
        report.add(path, child, "left", "already pycnn's")
        return True
    if isinstance(child, torch.nn.Conv2d):
        return _swap_conv(child, path, algo, report)
    if kind is torch.nn.BatchNorm2d:
        return _swap_bn(child, path, report)
    if kind is torch.nn.RReLU:
        report.add(path, child, "left", "pycnn's rrelu draws slopes 1/U(lower, upper), torch's U(lower, upper)")
        return True
    make = _ACTIVATIONS.get(kind)
    if make is None:
        base = next((k for k in (*_ACTIVATIONS, torch.nn.BatchNorm2d) if isinstance(child, k)), None)
        if base is not None:
            report.add(path, child, "left", f"a subclass of {base.__name__} ({kind.__name__}): its forward may differ")
        return base is not None
    reason = _pool_reason(child) if kind in (torch.nn.MaxPool2d, torch.nn.AvgPool2d) else None
    if reason is not None:
        report.add(path, child, "left", reason)
        return True
    new = make(child)
    if isinstance(child, torch.nn.PReLU):
        new.weight = child.weight  # the same Parameter
    _transplant(child, new)
    setattr(parent, name, new)
    report.add(path, child, "swapped", f"pycnn.torch.{type(new).__name__}")
    return True


def _swap_conv(conv, path, algo, report) -> bool:
    reason = _conv_reason(conv)
    if reason is not None:
        report.add(path, conv, "left", reason)
        return True
    report.add(path, conv, "swapped", f"pycnn.torch.Conv3x3 (algo {algo!r})")
    conv.__class__ = Conv3x3  # the same object: Parameters, hooks and mode stay
    conv.algo = algo
    if not conv.weight.is_contiguous():
        conv.weight.data = conv.weight.data.contiguous()
    return True


def _swap_bn(bn, path, report) -> bool:
    reason = _bn_reason(bn)
    if reason is not None:
        report.add(path, bn, "left", reason)
        return True
    report.add(path, bn, "swapped", "pycnn.torch.BatchNorm2d")
    bn.__class__ = BatchNorm2d
    return True


def _fuse(parent, first, act_name, act, prefix, first_name, walk) -> bool:
    """A Conv2d or a BatchNorm2d followed by an activation its op applies (conv3x3_act,
    batchnorm_act): one Conv3x3Act or BatchNormAct2d call."""
    if type(act) not in _EPILOGUES or _has_hooks(act) or _has_hooks(first):
        return False  # (a hook would see other tensors than it does now)
    if type(first) in (torch.nn.BatchNorm2d, BatchNorm2d):
        reason, fused_class, channels = _bn_reason(first), BatchNormAct2d, first.num_features
    elif type(first) in (torch.nn.Conv2d, Conv3x3):
        reason, fused_class, channels = _conv_reason(first, Conv3x3), Conv3x3Act, first.out_channels
    else:
        return False
    if reason is not None or (isinstance(act, torch.nn.PReLU) and act.num_parameters not in (1, channels)):
        return False
    activation, settings = _EPILOGUES[type(act)]
    walk.report.add(prefix + first_name, first, "fused",
                    f"pycnn.torch.{fused_class.__name__} ({activation}, applies {act_name})")
    walk.report.add(prefix + act_name, act, "fused", f"FusedActivation (applied by {first_name})")
    algo = first.algo if type(first) is Conv3x3 else walk.algo
    first.__class__ = fused_class  # the same object: Parameters, hooks and mode stay
    if fused_class is Conv3x3Act:
        first.algo = algo
    fused = FusedActivation(type(act).__name__)
    _transplant(act, fused)
    if isinstance(act, torch.nn.PReLU):
        fused.weight = act.weight  # same Parameter, same state_dict key
    first.set_activation(activation, prelu=fused if isinstance(act, torch.nn.PReLU) else None, **settings(act))
    setattr(parent, act_name, fused)
    return True


class FusedActivation(torch.nn.Module):
    """Where an activation was that the batch norm before it now applies: passes its input on
    (it holds the activation's parameter, PReLU's weight, under the same name)."""

    def __init__(self, fused: str):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        return x

    def extra_repr(self):
        return f"{self.fused}, applied by the batch norm before it"


# --------------------------------------------------------------------------- the checks

def _dtype_reason(t) -> str | None:
    if t is not None and t.dtype not in (torch.float32, torch.float64):
        return f"dtype {t.dtype}: pycnn runs float32 and float64"
    return None


def _bn_reason(bn) -> str | None:
    """Why pycnn's batchnorm cannot stand in for ``bn``; None where it can."""
    return _dtype_reason(bn.running_mean if bn.weight is None else bn.weight)


def _conv_reason(conv, also=None) -> str | None:
    """Why pycnn's conv3x3 cannot stand in for ``conv`` (a torch.nn.Conv2d, or of class
    ``also``); None where it can."""
    if type(conv) not in (torch.nn.Conv2d, also):
        return f"a subclass of Conv2d ({type(conv).__name__}): its forward may differ"
    checks = [("kernel_size", conv.kernel_size, ((3, 3),), "kernel_size != 3"),
              ("stride", conv.stride, ((1, 1),), "stride != 1"),
              ("padding", conv.padding, ((1, 1), "same"), "padding != 1"),
              ("dilation", conv.dilation, ((1, 1),), "dilation != 1"),
              ("groups", conv.groups, (1,), "groups != 1"),
              ("padding_mode", conv.padding_mode, ("zeros",), "padding_mode != 'zeros'")]
    for name, value, accepted, why in checks:
        if value not in accepted:
            return f"Conv2d({name}={value!r}): {why}"
    return _dtype_reason(conv.weight)


def _pool_reason(pool) -> str | None:
    def pair(v):
        return v if isinstance(v, tuple) else (v, v)
    checks = [("kernel_size", pair(pool.kernel_size), (2, 2)), ("stride", pair(pool.stride), (2, 2)),
              ("padding", pair(pool.padding), (0, 0)), ("ceil_mode", pool.ceil_mode, False)]
    if isinstance(pool, torch.nn.MaxPool2d):
        checks += [("dilation", pair(pool.dilation), (1, 1)), ("return_indices", pool.return_indices, False)]
    else:
        checks += [("divisor_override", pool.divisor_override, None)]
    for name, value, wanted in checks:
        if value != wanted:
            return f"{type(pool).__name__}({name}={value!r}): pycnn pools 2x2 windows, stride 2, no padding"
    return None


def _has_hooks(module) -> bool:
    return any(getattr(module, h, None) for h in _RUN_HOOKS + ("_forward_hooks_with_kwargs",
                                                               "_forward_pre_hooks_with_kwargs"))


def _transplant(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """``new`` takes ``old``'s hooks (the same dicts: their handles still remove them) and mode."""
    for name in _HOOKS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    new._is_full_backward_hook = getattr(old, "_is_full_backward_hook", None)
    new.train(old.training)
