"""Training runs end to end on the embedded real digits: validation held out of the training
set, the test set used once, accuracy, exact resume, run directory, early stopping, the
logged regularisation term, k-fold cross-validation, the initial loss."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("sklearn")

import pycnn.functional as F  # noqa: E402
from pycnn import models, schedules  # noqa: E402
from pycnn.autograd import Tensor, no_grad  # noqa: E402
from pycnn.training import pipeline, runs
from pycnn.training import trainer as trainer_module
from pycnn.training.config import Config, ConfigError
from pycnn.training.evaluation import evaluate_checkpoint
from pycnn.training.pipeline import split_data
from pycnn.training.runs import run, run_folds  # noqa: E402


def quick(**overrides) -> Config:
    base = dict(limit=600, epochs=2, widths=(8, 16), batch_size=32, flip=False, crop_padding=1, rotation=5.0,
                schedule="cosine", warmup_steps=5)
    return Config(**{**base, **overrides})


def test_digits_reach_a_stated_accuracy_quickly(tmp_path):
    history = run(Config(epochs=4, widths=(8, 16)), tmp_path / "run", progress=False)
    assert history["stopped"] is None
    assert max(history["val_accuracy"]) >= 0.93  # measured 0.97-0.99; a broken op falls far below
    assert history["test"]["accuracy"] >= 0.93 and history["test"]["images"] == 359
    assert history["test"]["epoch"] == history["best_epoch"] == 1 + int(np.argmax(history["val_accuracy"]))
    for name in ("config.json", "history.json", "history.csv", "loss.png", "accuracy.png", "lr.png",
                 "checkpoints/epoch_004.npz"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4
    assert json.loads((tmp_path / "run" / "history.json").read_text())["test"] == history["test"]


def test_validation_is_held_out_of_training_and_stratified():
    splits = split_data(Config())
    pool_x, pool_y, test_x, test_y = pipeline.load_data(Config())
    assert len(splits.val_y) == round(0.2 * len(pool_y)) and len(splits.train_y) + len(splits.val_y) == len(pool_y)
    np.testing.assert_array_equal(splits.test_y, test_y)  # the test set is left as it is
    share = np.bincount(splits.val_y) / np.bincount(pool_y)
    assert np.all(np.abs(share - 0.2) < 0.02)
    # validation images are not training images (rows compared as bytes)
    train_rows = {x.tobytes() for x in splits.train_x}
    assert sum(x.tobytes() in train_rows for x in splits.val_x) <= 3  # the digits set holds a few duplicates
    assert len(split_data(Config(val_size=100)).val_y) == 100
    assert len(split_data(Config(val_size=0)).val_y) == 0
    assert len(split_data(Config(dataset="digits", limit=500)).val_y) == 100


def test_limit_draws_a_stratified_sample_of_the_whole_pool():
    pool_x, pool_y, _, _ = pipeline.load_data(Config())
    x, y = pipeline.load_data(Config(limit=60))[:2]
    assert len(y) == 60 and np.all(np.bincount(y, minlength=10) == 6)
    rows = {row.tobytes(): i for i, row in enumerate(pool_x)}
    where = [rows[row.tobytes()] for row in x]
    # spread over the pool (the digits are stored writer by writer), not its first 60 images
    assert where == sorted(where) and where[-1] > 0.8 * len(pool_y) and where[29] > 60
    again = pipeline.load_data(Config(limit=60, seed=3))[0]
    np.testing.assert_array_equal(again, x)  # the same images for every training seed


def test_test_set_is_used_once_and_the_schedule_follows_validation(tmp_path, monkeypatch):
    calls, metrics = [], []
    original = runs.score_on_test

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runs, "score_on_test", counting)
    step_epoch = schedules.ReduceOnPlateau.step_epoch
    monkeypatch.setattr(schedules.ReduceOnPlateau, "step_epoch",
                        lambda self, metric=None: (metrics.append(metric), step_epoch(self, metric))[1])
    history = run(quick(schedule="plateau", epochs=3, limit=200), tmp_path / "run", progress=False)
    assert len(calls) == 1
    assert metrics == history["val_accuracy"]


def test_best_epoch_chooses_the_weights_scored_on_test_and_early_stop(tmp_path, monkeypatch):
    scripted = iter([(1.0, 0.50), (0.8, 0.70), (0.9, 0.60), (0.9, 0.65), (0.7, 0.90)])
    evaluate = trainer_module.Trainer.evaluate

    def fake_validation(self, loader):
        return next(scripted) if loader is self.val_loader else evaluate(self, loader)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", fake_validation)
    history = run(quick(epochs=5, early_stop=2, limit=150), tmp_path / "run", progress=False)
    assert history["best_epoch"] == 2 and len(history["val_accuracy"]) == 4
    assert "no better validation accuracy for 2 epochs after epoch 2" in history["early_stopped"]
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    loss, accuracy = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_002.npz", split="test")
    assert history["test"]["epoch"] == 2
    assert history["test"]["accuracy"] == pytest.approx(accuracy) and history["test"]["loss"] == pytest.approx(loss)


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    whole = run(quick(), tmp_path / "whole", progress=False)
    # a run that died right after writing its first checkpoint
    (tmp_path / "split" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "checkpoints" / "epoch_001.npz", tmp_path / "split" / "checkpoints")
    resumed = run(quick(prefetch=0), tmp_path / "split", resume=True, progress=False)
    assert resumed["batch_loss"] == whole["batch_loss"]
    assert resumed["val_accuracy"] == whole["val_accuracy"] and resumed["test"] == whole["test"]
    a = np.load(tmp_path / "whole" / "checkpoints" / "epoch_002.npz")
    b = np.load(tmp_path / "split" / "checkpoints" / "epoch_002.npz")
    for key in a.files:
        if key.startswith(("model/", "optim/")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_checkpoint_evaluates_to_the_recorded_accuracy(tmp_path):
    history = run(quick(epochs=1), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "checkpoints" / "epoch_001.npz"
    loss, accuracy = evaluate_checkpoint(path, split="val")
    assert accuracy == pytest.approx(history["val_accuracy"][-1])
    assert loss == pytest.approx(history["val_loss"][-1], rel=1e-5)
    loss, accuracy = evaluate_checkpoint(path)  # the test split, the default
    assert accuracy == pytest.approx(history["test"]["accuracy"])


def test_checkpoints_contain_no_pickle(tmp_path):
    run(quick(epochs=1), tmp_path / "run", progress=False)
    with np.load(tmp_path / "run" / "checkpoints" / "epoch_001.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def test_logged_loss_includes_the_regularisation_term(tmp_path):
    runs = {wd: run(quick(epochs=1, limit=100, weight_decay=wd), tmp_path / str(wd), progress=False)
            for wd in (0.0, 1.0)}
    # same initial weights and batch: the same data loss, a total that differs by the L2 term
    assert runs[0.0]["batch_data_loss"][0] == runs[1.0]["batch_data_loss"][0]
    assert runs[0.0]["batch_loss"][0] == runs[0.0]["batch_data_loss"][0]
    model = pipeline.build(quick(), *split_data(quick(limit=100))[:4])[0]
    l2 = sum(float((p.data.astype(np.float64) ** 2).sum()) for p in model.parameters() if p.ndim > 1)
    assert runs[1.0]["batch_loss"][0] - runs[1.0]["batch_data_loss"][0] == pytest.approx(0.5 * l2, rel=1e-5)
    h = runs[1.0]
    assert h["train_loss"][0] == pytest.approx(h["train_data_loss"][0] + h["train_reg_loss"][0])
    assert h["train_reg_loss"][0] > 0.1 and runs[0.0]["train_reg_loss"][0] == 0.0


def test_default_model_starts_near_ln_classes():
    config = Config()
    splits = split_data(config)
    model, *_, preprocessor = pipeline.build(config, splits.train_x, splits.train_y, classes=splits.classes)
    x, y = Tensor(preprocessor(splits.train_x[:512])), splits.train_y[:512]
    with no_grad():
        loss = F.softmax_cross_entropy(model(x), y).item()
    assert abs(loss - math.log(10)) < 0.05 * math.log(10)
    # the cause of the 3.35 it used to start at: a full-scale Xavier head on rectified, pooled features
    spec = pipeline.model_spec(config, 1, 8, 10)
    full = models.build({**spec, "head_gain": 1.0}, seed=config.seed)
    np.testing.assert_allclose(full[-1].weight.data, 10 * model[-1].weight.data, rtol=1e-6)
    with no_grad():
        assert F.softmax_cross_entropy(full(x), y).item() > 3.0


def test_exploding_loss_stops_the_run(tmp_path):
    history = run(quick(lr=50.0, epochs=3, schedule="none", warmup_steps=0), tmp_path / "run", progress=False)
    assert history["stopped"] is not None and history["test"] is None
    assert "initial value" in history["stopped"] or "nan" in history["stopped"].lower()


def test_hinge_loss_adam_plateau_and_balanced_sampling_train(tmp_path):
    history = run(quick(loss="hinge", optimizer="adam", lr=0.003, schedule="plateau", balance="upsample",
                        activation="prelu", max_norm=3.0), tmp_path / "run", progress=False)
    assert history["stopped"] is None and history["val_accuracy"][-1] > 0.5


def test_atomic_checkpoint_leaves_no_partial_file(tmp_path, monkeypatch):
    run(quick(epochs=1, schedule="step"), tmp_path / "run", progress=False)

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        run(quick(epochs=2, schedule="step"), tmp_path / "run", resume=True, progress=False)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["epoch_001.npz"]


def test_k_fold_cross_validation_leaves_the_test_set_alone(tmp_path):
    config = quick(folds=3, epochs=1, limit=150, widths=(4, 8))
    summary = run_folds(config, tmp_path / "cv", progress=False)
    assert len(summary["val_accuracy"]) == 3 and summary["mean"] == pytest.approx(np.mean(summary["val_accuracy"]))
    held = [split_data(Config.from_dict(config.to_dict(), fold=i)).val_y for i in range(3)]
    assert sum(len(h) for h in held) == 150
    for i in range(3):
        history = json.loads((tmp_path / "cv" / f"fold_{i + 1}" / "history.json").read_text())
        assert history["test"] is None and len(history["val_accuracy"]) == 1
    assert json.loads((tmp_path / "cv" / "folds.json").read_text())["val_accuracy"] == summary["val_accuracy"]


@pytest.mark.parametrize("values, message", [
    (dict(epochs=2.5), "epochs must be an integer >= 1, got 2.5"),
    (dict(lr="fast"), "lr must be a number > 0, got 'fast'"),
    (dict(flip="yes"), "flip must be true or false, got 'yes'"),
    (dict(widths="abc"), "widths must be a list of integers"),
    (dict(val_size=-3), "val_size must be an integer >= 0 or \"auto\", got -3"),
    (dict(folds=3, val_size=100), "exclude each other"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(classes=[3]), "at least two labels"),
    (dict(cuda_graph=True), "cuda_graph needs device cuda .*, got device cpu"),
])
def test_config_rejects_bad_values_naming_them(values, message):
    with pytest.raises(ConfigError, match=message):
        Config(**values)


@pytest.mark.parametrize("values, message", [
    (dict(crop_padding=40), r"crop_padding must be less than half the image side \(8x8 images: at most 3\)"),
    (dict(widths=(4, 8, 16, 32)), "widths has 4 stages, each halving the image: 8x8 images allow at most 3"),
    (dict(colour_jitter=True), "colour_jitter needs RGB images"),
    (dict(fancy_pca=0.1), "fancy_pca needs RGB images"),
    (dict(val_size=1000), "val_size must be at most half of the 1438 training images"),
    (dict(classes=(1, 12)), r"classes: labels \[12\] do not occur"),
])
def test_settings_are_checked_against_the_images(values, message):
    with pytest.raises(ConfigError, match=message):
        split_data(Config(**values))


def test_the_progress_bar_only_on_a_terminal_one_line_per_epoch_otherwise(tmp_path, capsys):
    run(quick(epochs=2, limit=150), tmp_path / "run", progress=True)
    out, err = capsys.readouterr()
    assert "batch/s" not in err and "it/s" not in err and "%|" not in err, err
    assert sum(line.startswith(("epoch 1: ", "epoch 2: ")) for line in out.splitlines()) == 2


def test_divergence_names_rate_and_warmup_shows_in_loss_png_and_is_said_once(tmp_path, capsys):
    from pycnn.training import cli
    status = cli.main(["train", "--lr", "50", "--schedule", "none", "--epochs", "2", "--limit", "200", "--checks",
                       "off", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert status == 1 and out.count("stopped") == 1, out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "--lr" in history["stopped"] and "--warmup-steps" in history["stopped"]
    last, first = history["batch_loss"][-1], history["batch_loss"][0]
    assert not math.isfinite(last) or last > 3 * first  # the diverging batch is in the history, so in loss.png
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_accuracy_figure_zooms_to_its_data():
    from pycnn.training import figures
    low, high = figures.zoom([0.95, 0.97, 0.99])
    assert 0.9 < low < 0.95 and 0.99 < high <= 1.0
    assert figures.zoom([]) == (0.0, 1.0)


def test_the_default_settings_train_on_real_cifar10(tmp_path):
    """CIFAR-10 with the defaults does not diverge: the rate warms up over the first epoch
    ("auto"); without a warm-up the default rate diverged within the first epoch."""
    from pycnn.data import datasets

    if not (datasets.cifar10_dir() / "train.npz").is_file():
        pytest.skip(f"CIFAR-10 not found at {datasets.cifar10_dir()}")
    history = run(Config(dataset="cifar10", limit=3000, epochs=1, prefetch=0), tmp_path / "run", progress=False,
                  test=False)
    assert not history["stopped"], history["stopped"]
    rates = history["batch_lr"]  # one epoch of warm-up: rising all the way
    assert rates[0] < rates[len(rates) // 2] < rates[-1] <= Config().lr
