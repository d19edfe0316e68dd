"""Per-layer readings of a training run every k steps (CS231n lecture 6, "babysitting"):

* activations: mean and standard deviation of each layer's output (a std that shrinks
  layer after layer means vanishing signals, one that grows means exploding ones);
* dead units: the share of a rectifier's units (channel x position) that are zero for every
  image of the batch;
* gradients: the L2 norm of each parameter tensor's gradient (data loss only);
* updates: ||step|| / ||w|| per weight tensor — about 1e-3 is healthy; far above means the
  learning rate is too high, far below too low.

``LayerDiagnostics(every=k)`` is driven by the Trainer: on a diagnostic step it runs the
forward pass layer by layer (``forward``), then reads gradients before the optimizer step
(``before_step``) and the update after it (``after_step``).  Every other step costs nothing.
Readings go to ``history["diagnostics"]``: a list of {"step": s, "layers": {name: {...}}}.
"""
from __future__ import annotations

import numpy as np

from pycnn import nn
from pycnn.device import array_module

_RECTIFIERS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU)


def _layer_name(index, layer) -> str:
    return f"{index}:{type(layer).__name__}"


def _norm(a) -> float:
    flat = a.reshape(-1)
    return float(np.sqrt(float(array_module(flat).dot(flat, flat))))


class LayerDiagnostics:
    def __init__(self, every: int = 50):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self._reading = None
        self._before = None

    def due(self, step: int) -> bool:
        """Whether step (0-based, counted over the whole run) is a diagnostic step."""
        return step % self.every == 0

    def forward(self, model, x, step: int):
        """The model's output, computed layer by layer with the activation readings recorded
        (a model that is not an nn.Sequential runs whole, without them)."""
        layers = {}
        self._reading = {"step": step, "layers": layers}
        if not isinstance(model, nn.Sequential):
            return model(x)
        for index, layer in enumerate(model):
            x = layer(x)
            if isinstance(layer, (nn.Conv3x3, nn.Linear, nn.BatchNorm) + _RECTIFIERS):
                data = x.data
                xp = array_module(data)
                entry = {"mean": float(data.mean()), "std": float(data.std())}
                if isinstance(layer, _RECTIFIERS):
                    entry["dead"] = float(xp.all(data <= 0, axis=0).mean())
                layers[_layer_name(index, layer)] = entry
        return x

    def before_step(self, model) -> None:
        """Gradient norms, and a copy of the weights to measure the update by."""
        if self._reading is None:
            return
        self._before = {}
        for index, layer in enumerate(model if isinstance(model, nn.Sequential) else [model]):
            for pname, p in layer._parameters.items():
                if p is None or p.grad is None:
                    continue
                key = _layer_name(index, layer)
                entry = self._reading["layers"].setdefault(key, {})
                entry[f"grad_norm.{pname}"] = _norm(p.grad)
                if p.ndim > 1:
                    self._before[(key, pname)] = (p, p.data.copy())

    def after_step(self, history: dict) -> None:
        """Update / weight ratios; appends the step's reading to history["diagnostics"]."""
        if self._reading is None:
            return
        for (key, pname), (p, old) in (self._before or {}).items():
            size = _norm(old)
            self._reading["layers"][key][f"update_ratio.{pname}"] = _norm(p.data - old) / size if size else 0.0
        history.setdefault("diagnostics", []).append(self._reading)
        self._reading, self._before = None, None


def series(history: dict, quantity: str) -> dict:
    """{layer name: (steps, values)} of one quantity ('std', 'dead', 'grad_norm.weight',
    'update_ratio.weight', ...) over the run's diagnostic steps."""
    out: dict = {}
    for reading in history.get("diagnostics") or []:
        for name, entry in reading["layers"].items():
            if quantity in entry:
                steps, values = out.setdefault(name, ([], []))
                steps.append(reading["step"])
                values.append(entry[quantity])
    return out
