"""Sanity checks before training (CS231n lecture 6, "babysitting the learning process"):

1. **initial loss**: a fresh network's scores are small, so its data loss is that of a
   uniform guess: ln(C) for softmax cross-entropy, C - 1 for the multiclass hinge loss;
   far above means the scores start too large (initialisation, pre-processing), far below
   that the labels leak or the task has fewer classes than the model outputs;
2. **regularisation**: adding the regularisation term raises the loss a little; a term as
   large as the data loss means the weight decay is too strong;
3. **overfit a tiny subset**: with regularisation off, the model must fit a few dozen
   training images to 100% training accuracy within a step budget, else something is broken
   or the learning rate is far off;
4. **gradient check**: in float64 on a tiny batch, the gradient of the whole model (data loss
   from autograd plus the regularisation gradient the optimizer adds) must agree with central
   finite differences of the logged loss along random directions, per parameter tensor (a
   direction that fails is measured again with smaller steps: a kink of ReLU or max pooling
   between the two points costs an error that shrinks with the step, a wrong backward not).

``run_checks(config, splits)`` returns a ``Report``; ``report.block()`` is the summary printed
by ``pycnn check`` (exit status 1 when a check fails) and at the start of ``pycnn train``.
The checks use their own copies of the model and restore pycnn's random state, so the
training that follows is the same with or without them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time

import numpy as np

import pycnn.functional as F
from pycnn import models
from pycnn import random as _random
from pycnn.autograd import Tensor, no_grad
from pycnn.data import datasets
from pycnn.training.config import ConfigError
from pycnn.training.pipeline import PREPROCESSORS, make_optimizer, model_spec
from pycnn.training.trainer import regularisation_loss


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    reading: str
    fix: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class Report:
    checks: list

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def block(self) -> str:
        lines = ["sanity checks (pycnn check):"]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'}  {c.name:<18} {c.reading}")
            if c.fix and not c.passed:
                lines.append(f"        {'':<18} fix: {c.fix}")
        failed = [c.name for c in self.checks if not c.passed]
        lines.append("  all checks passed" if not failed else f"  {len(failed)} failed: {', '.join(failed)}")
        return "\n".join(lines)


@contextlib.contextmanager
def _preserved_rng():
    state = copy.deepcopy(_random.generator().bit_generator.state)
    try:
        yield
    finally:
        _random.generator().bit_generator.state = state


def _data_loss(config, logits, labels):
    if config.loss == "hinge":
        return F.multiclass_hinge(logits, labels)
    return F.softmax_cross_entropy(logits, labels, label_smoothing=config.label_smoothing)


def expected_initial_loss(config, classes: int) -> tuple[float, str]:
    """(value, formula) of the data loss of all-zero scores."""
    if config.loss == "hinge":
        return float(classes - 1), f"C - 1 = {classes - 1}"
    return math.log(classes), f"ln {classes} = {math.log(classes):.4f}"


def run_checks(config, splits, overfit_images: int = 50, steps: int = 200, gradcheck: bool = True) -> Report:
    """The four checks of the module docstring for ``config`` on ``splits`` (train.Splits)."""

    if isinstance(overfit_images, bool) or not isinstance(overfit_images, int) or overfit_images < 2:
        raise ConfigError(f"images must be an integer >= 2, got {overfit_images!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    spec = model_spec(config, splits.train_x.shape[1], splits.train_x.shape[2], splits.classes)
    preprocessor = PREPROCESSORS[config.preprocess]().fit(splits.train_x)
    checks = []
    with _preserved_rng():
        _random.manual_seed(config.seed)
        model = models.build(spec, seed=config.seed)
        batch = min(256, len(splits.train_y))
        x, y = preprocessor(splits.train_x[:batch]).astype(np.float32), splits.train_y[:batch]
        checks.append(_timed(check_initial_loss, config, model, x, y, splits.classes))
        checks.append(_timed(check_regularisation, config, model, x, y, make_optimizer(config, model)))
        checks.append(_timed(check_overfit, config, spec, preprocessor, splits, overfit_images, steps))
        if gradcheck:
            checks.append(_timed(check_gradients, config, spec, preprocessor(splits.train_x[:4]), splits.train_y[:4]))
    return Report(checks)


def _timed(fn, *args) -> Check:
    start = time.perf_counter()
    result = fn(*args)
    result.seconds = time.perf_counter() - start
    return result


def check_initial_loss(config, model, x, y, classes: int) -> Check:
    model.train()
    with no_grad():
        logits = model(Tensor(x))
        loss = _data_loss(config, logits, y).item()
    expected, formula = expected_initial_loss(config, classes)
    spread = float(np.asarray(logits.data).std())
    off = (loss - expected) / expected
    reading = f"{loss:.4f} at the start, expected {formula} ({off:+.1%}); scores std {spread:.3f}"
    if abs(off) <= 0.10:
        return Check("initial loss", True, reading)
    if off > 0:
        fix = (f"the first scores are too large (std {spread:.2f}; about 0.1 or less keeps the loss near {formula}): "
               "start the last layer smaller (models.HEAD_GAIN scales its Xavier initialisation) and check that the "
               f"inputs are standardised (their std here is {float(x.std()):.2f})")
    else:
        present = len(np.unique(y))
        fix = (f"the loss is below chance: the model outputs {classes} classes and this batch holds {present}; "
               "look for labels leaking into the inputs or a loss computed on the wrong labels")
    return Check("initial loss", False, reading, fix)


def check_regularisation(config, model, x, y, optimizer) -> Check:
    model.train()
    with no_grad():
        data = _data_loss(config, model(Tensor(x)), y).item()
    reg = regularisation_loss(optimizer)
    if not (config.weight_decay or config.l1):
        return Check("regularisation", True,
                     f"data loss {data:.4f}; no regularisation term (weight_decay and l1 are 0)")
    reading = (f"data loss {data:.4f} + regularisation {reg:.4f} = {data + reg:.4f} (the term adds "
               f"{reg / data:.1%}; weight_decay {config.weight_decay:g}, l1 {config.l1:g})")
    if 0 < reg < data:
        return Check("regularisation", True, reading)
    if reg <= 0:
        return Check("regularisation", False, reading, "the regularisation term is 0 although weight_decay or l1 is "
                     "set: no parameter group carries it (see optim.param_groups)")
    strength = "weight_decay" if 0.5 * config.weight_decay >= config.l1 else "l1"
    return Check("regularisation", False, reading, f"the regularisation term outweighs the data loss from the start: "
                 f"{strength} {getattr(config, strength):g} is too strong (try a tenth of it)")


def check_overfit(config, spec, preprocessor, splits, images: int, steps: int) -> Check:
    """Fit ``images`` training images (stratified) with no regularisation: no weight decay,
    L1, max-norm, dropout or augmentation; full-batch steps of the configured optimizer."""

    images = min(images, len(splits.train_y) - 1)
    _, subset = datasets.stratified_holdout(splits.train_y, images, seed=0)
    x = Tensor(preprocessor(splits.train_x[subset]).astype(np.float32))
    y = splits.train_y[subset]
    model = models.build({**spec, "dropout": 0.0}, seed=config.seed)
    plain = dataclasses.replace(config, weight_decay=0.0, l1=0.0, max_norm=0.0, label_smoothing=0.0)
    optimizer = make_optimizer(plain, model, regularise=False)
    model.train()
    first = last = None
    accuracy = 0.0
    for step in range(1, steps + 1):  # noqa: B007 (read after the loop: the steps it took)
        logits = model(x)
        loss = _data_loss(plain, logits, y)
        last = loss.item()
        first = last if first is None else first
        accuracy = float((np.asarray(logits.data).argmax(axis=1) == y).mean())
        if accuracy == 1.0 or not math.isfinite(last):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    name = f"overfit {images} images"
    if accuracy == 1.0:
        return Check(name, True, f"100% training accuracy after {step - 1} steps (loss {first:.3f} -> {last:.3f}), "
                     "regularisation off")
    reading = (f"{accuracy:.0%} training accuracy after {steps} steps (loss {first:.3f} -> {last:.3f}), "
               "regularisation off")
    if not math.isfinite(last) or last > first:
        fix = f"the loss grew: the learning rate {config.lr:g} is too high for this model (try a tenth of it)"
    elif last > 0.8 * first:
        fix = (f"the loss hardly fell: the learning rate {config.lr:g} is too low (try 10x), or the model or loss is "
               "broken (see the gradient check)")
    else:
        fix = f"the loss falls but too slowly: raise the learning rate {config.lr:g} or the step budget (--steps)"
    return Check(name, False, reading, fix)


def _to_float64(model) -> None:
    for p in model.parameters():
        p.data = np.asarray(p.data, dtype=np.float64)
    for _, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            module.register_buffer(name, np.asarray(buffer, dtype=np.float64))


def check_gradients(config, spec, x, y, directions: int = 2, eps: float = 1e-6, tolerance: float = 1e-4) -> Check:
    """Directional derivatives of the logged loss (data + regularisation) along random
    directions, analytic (autograd + the optimizer's regularisation gradient) against
    central differences, in float64 on a tiny batch in training mode (fixed random seeds, so
    dropout draws the same mask every time)."""

    model = models.build(spec, seed=config.seed)
    _to_float64(model)
    optimizer = make_optimizer(config, model)
    x = np.asarray(x, dtype=np.float64)
    model.train()
    decay = {id(p): (g["weight_decay"], g["l1"]) for g in optimizer.param_groups for p in g["params"]}

    def loss_value() -> float:
        _random.manual_seed(12345)
        with no_grad():
            return _data_loss(config, model(Tensor(x)), y).item() + regularisation_loss(optimizer)

    _random.manual_seed(12345)
    loss = _data_loss(config, model(Tensor(x)), y)
    optimizer.zero_grad()
    loss.backward()
    def relative_error(p, d, analytic, step) -> float:
        original = p.data.copy()
        p.data[...] = original + step * d
        plus = loss_value()
        p.data[...] = original - step * d
        minus = loss_value()
        p.data[...] = original
        numeric = (plus - minus) / (2 * step)
        return abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-8)

    rng = np.random.default_rng(0)
    worst, worst_name, count, kinks = 0.0, None, 0, 0
    for name, p in model.named_parameters():
        wd, l1 = decay[id(p)]
        grad = np.asarray(p.grad if p.grad is not None else np.zeros_like(p.data)) + wd * p.data + l1 * np.sign(p.data)
        for _ in range(directions):
            d = rng.standard_normal(p.data.shape)
            analytic = float((grad * d).sum())
            error = relative_error(p, d, analytic, eps)
            # A difference whose two points straddle a kink (a ReLU input crossing 0, a max-pool
            # switching its maximum) is off by an amount that vanishes with the step (the chance
            # of straddling one is proportional to it); a wrong backward pass stays off.  So a
            # failing direction is measured again with steps 10x and 100x smaller.
            for step in (eps / 10, eps / 100):
                if error <= tolerance:
                    break
                error = min(error, relative_error(p, d, analytic, step))
                kinks += error <= tolerance
            count += 1
            if error > worst:
                worst, worst_name = error, name
    tensors = len(list(model.named_parameters()))
    rechecked = (f"; {kinks} direction{'s' if kinks > 1 else ''} straddled a kink and passed with a smaller step"
                 if kinks else "")
    reading = (f"float64, {len(y)} images: largest relative error {worst:.1e} over {count} random directions "
               f"({tensors} parameter tensors, loss with regularisation{rechecked})")
    if worst <= tolerance:
        return Check("gradient check", True, reading)
    return Check("gradient check", False, f"{reading}, worst in {worst_name}",
                 f"the backward pass of the layer holding {worst_name} disagrees with its forward (above "
                 f"{tolerance:g}; run the op gradchecks in tests/ for that layer's ops)")
