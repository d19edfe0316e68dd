"""Learning-rate schedules.  Each one sets ``group["lr"]`` of every parameter group of an
optimizer as a factor of the group's ``initial_lr`` (so per-group rates keep their ratios).

* ``StepLR``: multiply by ``gamma`` every ``step_size`` epochs;
* ``CosineLR``: cosine from 1 down to ``min_factor`` over ``total_epochs``;
* ``ReduceOnPlateau``: divide by ``factor`` (2 or 5 are the usual) when the validation
  metric has not improved for ``patience`` epochs, never below ``min_lr``;
Every schedule takes ``warmup_steps``: a linear warm-up of the rate from 1/warmup_steps
to 1 over the first batches (Goyal et al. 2017).

``step_batch()`` is called after every batch and ``step_epoch(metric)`` after every epoch;
each schedule uses the one it needs.
"""
from __future__ import annotations

import math

from pycnn.ops._util import check_integer


class Schedule:
    def __init__(self, optimizer, warmup_steps: int = 0):
        check_integer("warmup_steps", warmup_steps, 0)
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.epoch = 0
        self.batch = 0
        self.factor = 1.0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            lr = max(group["initial_lr"] * self.factor, self._floor(group["initial_lr"]))
            group["lr"] = lr * self._warmup_factor()

    def _floor(self, initial_lr: float) -> float:
        """The lowest rate the schedule takes a group that starts at initial_lr to."""
        return 0.0

    def _warmup_factor(self) -> float:
        if not self.warmup_steps:
            return 1.0
        return min(1.0, (self.batch + 1) / self.warmup_steps)

    def step_batch(self) -> None:
        self.batch += 1
        self._apply()

    def step_epoch(self, metric: float | None = None) -> None:
        self.epoch += 1
        self.factor = self._epoch_factor(metric)
        self._apply()

    def _epoch_factor(self, metric) -> float:
        return self.factor

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # what changes while training (settings come from the constructor, so a resumed run
    # may change them, e.g. train for more epochs)
    _progress = ("epoch", "batch", "factor", "best", "bad_epochs")

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._progress if hasattr(self, key)}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self._progress))
        if unknown:
            raise ValueError(f"state holds {unknown}: a schedule's state has only {list(self._progress)}")
        vars(self).update(state)
        self._apply()


class ConstantLR(Schedule):
    pass


class StepLR(Schedule):
    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, warmup_steps: int = 0):
        check_integer("step_size", step_size, 1)
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, warmup_steps)

    def _epoch_factor(self, metric):
        return self.gamma ** (self.epoch // self.step_size)


class CosineLR(Schedule):
    def __init__(self, optimizer, total_epochs: int, min_factor: float = 0.0, warmup_steps: int = 0):
        check_integer("total_epochs", total_epochs, 1)
        if not 0 <= min_factor <= 1:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
        self.total_epochs, self.min_factor = total_epochs, min_factor
        super().__init__(optimizer, warmup_steps)

    def _epoch_factor(self, metric):
        progress = min(self.epoch / self.total_epochs, 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class ReduceOnPlateau(Schedule):
    """Divide the rate by ``factor`` when ``metric`` has not improved by more than
    ``threshold`` (relative) for ``patience`` epochs; ``mode='max'`` for accuracies."""

    def __init__(self, optimizer, factor: float = 2.0, patience: int = 3, min_lr: float = 1e-5,
                 mode: str = "max", threshold: float = 1e-3, warmup_steps: int = 0):
        if not 1 < factor < math.inf:
            raise ValueError(f"factor must be a finite number > 1 (the rate is divided by it), got {factor}")
        check_integer("patience", patience, 0)
        if not 0 <= min_lr < math.inf:
            raise ValueError(f"min_lr must be a finite number >= 0, got {min_lr}")
        if not 0 <= threshold < math.inf:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.divide_by, self.patience, self.min_lr = factor, patience, min_lr
        self.mode, self.threshold = mode, threshold
        self.best = None
        self.bad_epochs = 0
        super().__init__(optimizer, warmup_steps)

    def _floor(self, initial_lr: float) -> float:
        return min(self.min_lr, initial_lr)  # every group down to min_lr, none raised to it

    def _improved(self, metric) -> bool:
        if math.isnan(metric):  # a diverged epoch is no improvement, and never the best
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return metric > self.best + self.threshold * abs(self.best)
        return metric < self.best - self.threshold * abs(self.best)

    def _epoch_factor(self, metric):
        if metric is None:
            raise ValueError("ReduceOnPlateau.step_epoch needs the validation metric")
        if self._improved(metric):
            self.best, self.bad_epochs = metric, 0
            return self.factor
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.bad_epochs = 0
            # no lower than where every group is at its floor (_floor): the factor would only shrink
            lowest = self.min_lr / max(g["initial_lr"] for g in self.optimizer.param_groups)
            return min(self.factor, max(self.factor / self.divide_by, lowest))
        return self.factor

