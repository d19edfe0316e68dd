"""Optimizers with the regularisers of CS231n lecture 6.

The loss is a mean over the batch, so a learning rate does not depend on the batch size.
Each parameter group may set, besides ``lr``:

* ``weight_decay``: L2, adds ``weight_decay * w`` to the gradient;
* ``l1``: L1, adds ``l1 * sign(w)`` (both together: the elastic net);
* ``max_norm``: after each update, every neuron's / filter's incoming weight vector (a row
  of the weight reshaped to (out, -1)) whose L2 norm exceeds ``max_norm`` is scaled back
  onto the ball of that radius (typical values 3 to 4).

``param_groups(model, ...)`` builds the usual two groups: weights regularised, biases and
batch-norm parameters (every parameter of fewer than 2 dimensions) not.
"""
from __future__ import annotations

import numpy as np

from pycnn import cuda_graph
from pycnn.autograd import no_grad
from pycnn.device import array_module, is_cuda_array
from pycnn.ops import cuda_backend

GROUP_DEFAULTS = dict(weight_decay=0.0, l1=0.0, max_norm=None)


def param_groups(model, weight_decay: float = 0.0, l1: float = 0.0, max_norm: float | None = None,
                 regularise_biases: bool = False) -> list[dict]:
    """[weights with the regularisers, biases and BN parameters without] for an optimizer."""
    weights, others = [], []
    for _, p in model.named_parameters():
        (weights if p.ndim > 1 or regularise_biases else others).append(p)
    groups = [{"params": weights, "weight_decay": weight_decay, "l1": l1, "max_norm": max_norm}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "l1": 0.0, "max_norm": None})
    return groups


def _check_group(group: dict) -> None:
    for key in ("lr", "weight_decay", "l1"):
        value = group[key]
        if isinstance(value, (np.integer, np.floating)):  # a NumPy scalar, e.g. from a search space
            value = group[key] = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0 \
                or (key == "lr" and value == 0):
            raise ValueError(f"{key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, got {value!r}")
    if group["max_norm"] is not None and not group["max_norm"] > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {group['max_norm']!r}")


class Optimizer:
    """Holds parameter groups; subclasses define ``_update(p, grad, group, state)``."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError("params must not be empty")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            merged = {**GROUP_DEFAULTS, **defaults, **group}
            merged["params"] = list(merged["params"])
            _check_group(merged)
            merged.setdefault("initial_lr", merged["lr"])
            self._check_settings(merged)
            self.param_groups.append(merged)
        seen = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in seen:
                    raise ValueError(f"params: group {gi} position {pi} is the parameter already at group "
                                     f"{seen[id(p)][0]} position {seen[id(p)][1]}; list each once (it would be "
                                     "updated twice a step)")
                seen[id(p)] = (gi, pi)
        self.state: dict[int, dict] = {}

    STATE_KEYS: tuple = ()  # the per-parameter state a subclass keeps

    def _check_settings(self, group: dict) -> None:
        """A subclass's checks of its own settings, in every group."""

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        with no_grad():
            fused = []  # (p, group, state) of the parameters the optimizer's kernels update
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state.setdefault(id(p), {})
                    if self._fusable(p, group):
                        fused.append((p, group, state))
                        continue
                    cuda_graph.require_eager("an update outside the optimizer's kernels (an L1 term, a "
                                             "non-contiguous or host parameter)")
                    grad = p.grad
                    if group["weight_decay"]:
                        grad = grad + group["weight_decay"] * p.data
                    if group["l1"]:
                        grad = grad + group["l1"] * array_module(p.data).sign(p.data)
                    p.data -= self._update(p, grad, group, state).astype(p.dtype, copy=False)
                    if group["max_norm"] is not None and p.ndim > 1:
                        _project_rows(p.data, group["max_norm"])
            self._apply_fused(fused)

    def _apply_fused(self, fused) -> None:
        if fused:
            self._fused_updates(fused)
            for p, group, _ in fused:
                if group["max_norm"] is not None and p.ndim > 1:
                    _project_rows(p.data, group["max_norm"])

    def _update(self, p, grad, group, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fusable(self, p, group) -> bool:
        """Whether the optimizer's kernels update this parameter (regularisers included,
        max-norm projected afterwards); False: the array operations of ``_update``."""
        return False

    def _fused_updates(self, items) -> None:  # pragma: no cover - only with _fusable
        """Update every (p, group, state) of ``items`` with the optimizer's kernels."""
        raise NotImplementedError

    # --------------------------------------------------------- state, for checkpoints
    def state_dict(self) -> dict:
        """Learning rates and per-parameter state (by position), as host arrays."""
        out = {"lr": [g["lr"] for g in self.param_groups]}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                for key, value in self.state.get(id(p), {}).items():
                    out[f"{gi}.{pi}.{key}"] = value.get() if hasattr(value, "get") and not isinstance(
                        value, (np.ndarray, np.generic, int, float)) else value
        return out

    def load_state_dict(self, state: dict) -> None:
        """What ``state_dict`` gave, checked whole before anything is changed: the groups,
        each key's parameter, the state this optimizer keeps, and each array's shape."""
        if "lr" not in state:
            raise ValueError("state has no 'lr': not an optimizer's state_dict")
        lrs = list(state["lr"])
        if len(lrs) != len(self.param_groups):
            raise ValueError(f"state has {len(lrs)} parameter groups, the optimizer {len(self.param_groups)}")
        loaded: dict[int, dict] = {}
        for key, value in state.items():
            if key == "lr":
                continue
            parts = str(key).split(".", 2)
            if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                raise ValueError(f"state key {key!r} is not GROUP.POSITION.NAME")
            gi, pi, name = int(parts[0]), int(parts[1]), parts[2]
            if gi >= len(self.param_groups) or pi >= len(self.param_groups[gi]["params"]):
                raise ValueError(f"state key {key!r}: the optimizer has no parameter {pi} in group {gi}")
            if name not in self.STATE_KEYS:
                raise ValueError(f"state key {key!r}: {type(self).__name__} keeps {', '.join(self.STATE_KEYS)}, "
                                 f"not {name!r} (a state of another optimizer?)")
            p = self.param_groups[gi]["params"][pi]
            if np.ndim(value) and tuple(np.shape(value)) != tuple(p.shape):
                raise ValueError(f"state key {key!r} has shape {tuple(np.shape(value))}, its parameter "
                                 f"{tuple(p.shape)}")
            xp = array_module(p.data)
            loaded.setdefault(id(p), {})[name] = xp.asarray(value, dtype=p.dtype) if np.ndim(value) else value
        for group, lr in zip(self.param_groups, lrs):
            group["lr"] = float(lr)
        self.state = loaded


def _project_rows(weight, max_norm: float) -> None:
    """Scale each row of weight.reshape(out, -1) down to L2 norm max_norm where it exceeds it."""
    xp = array_module(weight)
    rows = weight.reshape(weight.shape[0], -1)
    norms = xp.sqrt((rows.astype(xp.float64) ** 2).sum(axis=1, keepdims=True))
    scale = xp.minimum(1.0, max_norm / xp.maximum(norms, 1e-12)).astype(weight.dtype)
    rows *= scale


def _cuda_kernels(w, grad, group):
    """The fused optimizer kernels (pycnn.kernels.optim) where they apply to this parameter:
    a C-contiguous CUDA array with a gradient of its dtype, and no L1 term; else None."""
    if group["l1"] or not is_cuda_array(w) or not (w.flags.c_contiguous and grad.flags.c_contiguous) \
            or grad.dtype != w.dtype:
        return None
    return cuda_backend.optimizer_kernels()


def _adam_counter(group, state):
    """A captured step's getter of one parameter's (lr, 1 - beta1**step, 1 - beta2**step):
    it counts the step, as the eager update does."""
    def row():
        state["step"] = step = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        return group["lr"], 1 - beta1 ** step, 1 - beta2 ** step
    return row


class SGD(Optimizer):
    """SGD with momentum, classical or Nesterov (PyTorch's formulation):
        v = momentum * v + grad
        w -= lr * (grad + momentum * v)   if nesterov, else   w -= lr * v"""

    STATE_KEYS = ("velocity",)

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 l1: float = 0.0, max_norm: float | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      l1=l1, max_norm=max_norm))

    def _check_settings(self, group: dict) -> None:
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov needs momentum > 0")

    def _fusable(self, p, group) -> bool:
        return _cuda_kernels(p.data, p.grad, group) is not None

    def _fused_updates(self, items) -> None:
        """CUDA parameters: multi-tensor kernels (pycnn.kernels.optim.sgd_multi_step), one
        launch for up to 20 parameters of the same momentum and Nesterov flag, whatever their
        groups' lr and weight decay, instead of the six array operations of _update per
        parameter; L1 keeps the generic path."""
        live = cuda_graph.active()  # capturing a CUDA graph: lr is read on the device at each replay
        buckets: dict = {}
        for p, group, state in items:
            w = p.data
            velocity, first = None, False
            if group["momentum"]:
                velocity = state.get("velocity")
                first = velocity is None
                if first:
                    if live is not None:
                        raise cuda_graph.GraphCaptureError("SGD's first step (it creates the velocity)")
                    velocity = state["velocity"] = array_module(w).empty_like(w)
            lr = group["lr"] if live is None else (lambda group=group: (group["lr"],))
            buckets.setdefault((group["momentum"], bool(group["nesterov"])), []).append(
                (w, p.grad, velocity, lr, group["weight_decay"], first))
        kernels = _cuda_kernels(items[0][0].data, items[0][0].grad, items[0][1])
        for (momentum, nesterov), entries in buckets.items():
            kernels.sgd_multi_step(entries, momentum, nesterov, live=None if live is None else live.values)

    def _update(self, p, grad, group, state):
        momentum = group["momentum"]
        if momentum:
            v = state.get("velocity")
            v = grad.copy() if v is None else momentum * v + grad
            state["velocity"] = v
            grad = grad + momentum * v if group["nesterov"] else v
        return group["lr"] * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction; weight_decay is the L2 term added to
    the gradient (as in PyTorch's Adam, not AdamW)."""

    STATE_KEYS = ("m", "v", "step")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 l1: float = 0.0, max_norm: float | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1,
                                      max_norm=max_norm))

    def _check_settings(self, group: dict) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        group["betas"] = (float(betas[0]), float(betas[1]))
        if not 0 < group["eps"] < np.inf:
            raise ValueError(f"eps must be a finite number > 0, got {group['eps']}")

    def _fusable(self, p, group) -> bool:
        return _cuda_kernels(p.data, p.grad, group) is not None

    def _fused_updates(self, items) -> None:
        """CUDA parameters: multi-tensor kernels (pycnn.kernels.optim.adam_multi_step), one
        launch for up to 15 parameters of the same betas and eps (each parameter its own
        step count, lr and weight decay); L1 keeps the generic path, as in SGD."""
        live = cuda_graph.active()  # capturing a CUDA graph: the step is counted at each replay
        buckets: dict = {}
        for p, group, state in items:
            w = p.data
            step = state.get("step", 0) + 1
            lr = group["lr"]
            if step == 1:
                if live is not None:
                    raise cuda_graph.GraphCaptureError("Adam's first step (it creates the moments)")
                state["m"], state["v"] = array_module(w).empty_like(w), array_module(w).empty_like(w)
            if live is None:
                state["step"] = step
            else:
                lr = _adam_counter(group, state)
            buckets.setdefault((tuple(group["betas"]), group["eps"]), []).append(
                (w, p.grad, state["m"], state["v"], lr, group["weight_decay"], step))
        kernels = _cuda_kernels(items[0][0].data, items[0][0].grad, items[0][1])
        for ((beta1, beta2), eps), entries in buckets.items():
            kernels.adam_multi_step(entries, beta1, beta2, eps, live=None if live is None else live.values)

    def _update(self, p, grad, group, state):
        beta1, beta2 = group["betas"]
        step = state.get("step", 0) + 1
        m = state.get("m")
        v = state.get("v")
        m = (1 - beta1) * grad if m is None else beta1 * m + (1 - beta1) * grad
        v = (1 - beta2) * grad * grad if v is None else beta2 * v + (1 - beta2) * grad * grad
        state.update(step=step, m=m, v=v)
        m_hat = m / (1 - beta1 ** step)
        v_hat = v / (1 - beta2 ** step)
        return group["lr"] * m_hat / (array_module(v_hat).sqrt(v_hat) + group["eps"])
