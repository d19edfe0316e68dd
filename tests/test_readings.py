"""The report's readings on runs made to be bad: the real trainer on the embedded digits, with
a learning rate far too high (diverging, or jumping and stalling), far too low, and no
regularisation on a tiny training set for many epochs (overfitting); a good run must get
none of those verdicts.  Then the rules themselves on hand-made histories."""
from __future__ import annotations

import functools

import pytest

pytest.importorskip("sklearn")

from pycnn.training import report  # noqa: E402
from pycnn.training.config import Config
from pycnn.training.pipeline import build, split_data  # noqa: E402
from pycnn.training.trainer import Trainer  # noqa: E402

# 320 training images in batches of 16: 60 steps, per-layer readings every 5; no warm-up, so
# each run's rate is the one it names from the first step
TINY = dict(limit=400, widths=(8, 16), batch_size=16, epochs=3, diagnostics_every=5, prefetch=0, warmup_steps=0)
RUNS = {
    "good": {},                                  # the default rate, 0.05
    "diverges": dict(lr=1.0),                    # 20x: past 3x the first loss within a few steps
    "jumps": dict(lr=0.2),                       # 4x: the loss doubles, then crawls back
    "too_low": dict(lr=1e-5),                    # 1/5000: barely moves
    # 50 training images, 50 validation images, nothing against overfitting, 30 epochs
    "overfits": dict(limit=100, val_size=50, batch_size=10, epochs=30, dropout=0.0, weight_decay=0.0,
                     schedule="none"),
}


@functools.cache
def trained(name: str) -> tuple[dict, dict]:
    """(history, {topic: verdict}) of one of RUNS, trained once per test session."""
    config = Config(**{**TINY, **RUNS[name]})
    splits = split_data(config)
    model, optimizer, schedule, train_loader, val_loader, _ = build(
        config, splits.train_x, splits.train_y, splits.val_x, splits.val_y, classes=splits.classes)
    trainer = Trainer(model, optimizer, train_loader, val_loader, schedule=schedule, progress=False,
                      diagnostics_every=config.diagnostics_every)
    history = trainer.fit(config.epochs)
    verdicts = {r.topic: r.verdict for r in report.diagnose(history, splits.classes)}
    return history, verdicts


def test_a_good_run_is_not_flagged():
    history, verdicts = trained("good")
    assert history["stopped"] is None
    assert verdicts["learning_rate"] == "ok" and verdicts["start"] == "ok"
    assert verdicts["fit"] == "ok" and verdicts["updates"] == "ok" and verdicts["dead_units"] == "ok"


@pytest.mark.parametrize("name", ["diverges", "jumps"])
def test_a_rate_far_too_high_is_read_as_too_high(name):
    history, verdicts = trained(name)
    assert (history["stopped"] is not None) == (name == "diverges")
    assert verdicts["learning_rate"] == "too_high"
    assert verdicts.get("updates") == "too_high"  # the CS231n ratio agrees: far above 1e-3


def test_a_rate_far_too_low_is_read_as_too_low():
    history, verdicts = trained("too_low")
    assert history["stopped"] is None
    assert verdicts["learning_rate"] == "too_low" and verdicts["updates"] == "too_low"
    assert verdicts["fit"] == "underfitting"


def test_no_regularisation_on_a_tiny_set_is_read_as_overfitting(tmp_path):
    history, verdicts = trained("overfits")
    assert history["train_accuracy"][-1] == 1.0 and history["val_images"] == 50
    assert verdicts["fit"] == "overfitting"
    assert verdicts["learning_rate"] == "ok"
    for name in ("good", "too_low"):
        assert trained(name)[1]["fit"] != "overfitting"
    page = report.write_report(history, {"dataset": "digits"}, tmp_path, classes=10).read_text()
    assert "Flagged: Fit: overfitting" in page and 'class="flag"' in page


# ------------------------------------------------------------------ rules on hand-made histories

def curve(values, repeat=10):
    return [float(v) for v in values for _ in range(repeat)]


def ratios(value, layers=("0:Conv3x3", "4:Conv3x3")):
    return [{"step": s, "layers": {n: {"update_ratio.weight": value} for n in layers}} for s in range(0, 40, 5)]


def verdict(history, topic, classes=10):
    found = [r for r in report.diagnose(history, classes) if r.topic == topic]
    return found[0].verdict if found else None


def test_a_stalled_loss_is_too_high_or_too_low_by_the_update_ratio():
    flat = {"batch_loss": curve([2.30, 2.31, 2.29, 2.30]), "batch_data_loss": curve([2.30, 2.31, 2.29, 2.30])}
    assert verdict(flat, "learning_rate") == "too_low"  # no per-layer readings: a smooth stall
    assert verdict({**flat, "diagnostics": ratios(3e-3)}, "learning_rate") == "too_high"
    assert verdict({**flat, "diagnostics": ratios(1e-6)}, "learning_rate") == "too_low"
    jump = curve([2.3, 4.0, 3.0, 2.2, 2.2])
    assert verdict({"batch_loss": jump, "batch_data_loss": jump}, "learning_rate") == "too_high"
    linear = curve([2.3, 2.1, 1.9, 1.7, 1.5, 1.3])
    assert verdict({"batch_loss": linear, "batch_data_loss": linear}, "learning_rate") == "too_low"
    good = curve([2.3, 0.9, 0.5, 0.4, 0.35, 0.33])
    assert verdict({"batch_loss": good, "batch_data_loss": good, "diagnostics": ratios(2e-3)}, "learning_rate") == "ok"
    tuned = curve([0.3, 0.29, 0.3, 0.29])  # fine-tuning from trained weights: no stall verdict
    assert verdict({"batch_loss": tuned, "batch_data_loss": tuned}, "learning_rate") == "info"


def test_a_gap_within_the_noise_of_the_validation_accuracy_is_not_overfitting():
    history = {"train_accuracy": [0.9, 1.0, 1.0], "val_accuracy": [0.8, 0.9, 0.9], "best_epoch": 2}
    assert verdict(history, "fit") == "overfitting"  # 0.1 above, the size of the validation set unknown
    assert verdict({**history, "val_images": 1000}, "fit") == "overfitting"  # standard error 0.009
    assert verdict({**history, "val_images": 20}, "fit") == "ok"  # standard error 0.067: within 2 of them
    low = {"train_accuracy": [0.3, 0.4], "val_accuracy": [0.35, 0.4], "best_epoch": 2, "val_images": 500}
    assert verdict(low, "fit") == "underfitting" and verdict(low, "fit", classes=2) == "underfitting"
    assert verdict({**low, "val_accuracy": [0.5, 0.9], "train_accuracy": [0.5, 0.9]}, "fit") == "ok"
