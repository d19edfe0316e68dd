"""Training runs: one ``Config`` (flags of ``pycnn train``, or keys of a TOML file) describes
data, pre-processing, augmentation, model, optimiser, schedule and loss; ``run`` trains it
and writes a run directory:

    RUN_DIR/config.json            the config
    RUN_DIR/history.json, .csv     per-batch loss and learning rate, per-epoch loss (data +
                                   regularisation) / accuracy / lr / speed, the best epoch and
                                   the test result
    RUN_DIR/checkpoints/epoch_NNN.npz   model, optimiser, schedule, RNG, pre-processing
    RUN_DIR/checkpoints/epoch_NNN_part_BBBBB.npz   an epoch interrupted by Ctrl-C
    RUN_DIR/loss.png, accuracy.png, lr.png, layers.png   the figures
    RUN_DIR/report.html            the figures and their readings in words, self-contained

Three disjoint sets of images (``split_data``): training; validation, held out of the
training set (stratified, ``val_size``; the same images for every seed), which drives the
plateau schedule, early stopping and the choice of the best epoch; and the test set, used
once at the end on the best epoch's weights and reported on its own.  ``folds = k`` runs
k-fold cross-validation instead (``run_folds``): k runs, each validating on one fold, and the
test set untouched.

``run(config, resume=True)`` continues from the newest readable checkpoint of RUN_DIR (an
unreadable one is reported and the previous one used) and gives the same result as an
uninterrupted run.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import NamedTuple

import numpy as np

import pycnn
from pycnn.data import augment, datasets, preprocess
from pycnn import data, models, optim, schedules
from pycnn.training.config import DEFAULT_VAL_FRACTION, Config, ConfigError, check_against_data
from pycnn.training.trainer import CheckpointError, Trainer, list_checkpoints, read_checkpoint

__all__ = ["Config", "ConfigError", "RunDirError", "Splits", "build", "evaluate_checkpoint", "load_data",
           "run", "run_folds", "split_data", "latest_checkpoint", "write_history"]

SPLIT_SEED = 0  # the validation split and the folds do not move with the training seed


class RunDirError(ValueError):
    """The run directory cannot be used (not writable, missing for --resume, no readable checkpoint)."""


# ------------------------------------------------------------------------------- data

def load_data(config: Config):
    """(train_images, train_labels, test_images, test_labels), images uint8 NCHW: the training
    pool (validation not yet held out; ``classes`` and ``limit`` applied: ``limit`` keeps N
    images drawn stratified from the whole pool, in their order) and the test set."""
    if config.dataset == "digits":
        images, labels = datasets.digits()
        train_x, train_y, test_x, test_y = datasets.train_test_split(images, labels, 0.2, seed=0)
    else:
        train_x, train_y = datasets.cifar10_shared("train")
        test_x, test_y = datasets.cifar10_shared("test")
    if config.classes:
        try:
            train_x, train_y = datasets.select_classes(train_x, train_y, config.classes)
            test_x, test_y = datasets.select_classes(test_x, test_y, config.classes)
        except ValueError as exc:
            raise ConfigError(f"classes: {exc} in {config.dataset}") from None
    if config.limit and config.limit < len(train_y):
        # a stratified draw spread over the whole pool (the same for every training seed), not the
        # first N: the digits are stored writer by writer, so the first N images come from a few
        # writers, and a validation set held out of them scores far above the test set
        _, chosen = datasets.stratified_holdout(train_y, config.limit, seed=SPLIT_SEED)
        train_x, train_y = train_x[chosen], train_y[chosen]
    return train_x, train_y, test_x, test_y


class Splits(NamedTuple):
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray      # empty when val_size = 0
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: int


def validation_size(config: Config, n_train: int) -> int:
    if config.val_size != "auto":
        return config.val_size
    return max(1, round(DEFAULT_VAL_FRACTION[config.dataset] * n_train))


def split_data(config: Config) -> Splits:
    """Training, validation (stratified, held out of the training pool) and test images."""
    pool_x, pool_y, test_x, test_y = load_data(config)
    check_against_data(config, pool_x.shape[1], pool_x.shape[2], len(pool_y))
    if config.folds:
        val = datasets.stratified_folds(pool_y, config.folds, seed=SPLIT_SEED)[config.fold]
        keep = np.setdiff1d(np.arange(len(pool_y)), val)
    elif validation_size(config, len(pool_y)):
        keep, val = datasets.stratified_holdout(pool_y, validation_size(config, len(pool_y)), seed=SPLIT_SEED)
    else:
        keep, val = np.arange(len(pool_y)), np.arange(0)
    classes = len(config.classes) or int(max(pool_y.max(), test_y.max()) + 1)
    return Splits(pool_x[keep], pool_y[keep], pool_x[val], pool_y[val], test_x, test_y, classes)


PREPROCESSORS = {
    "standardise": lambda: preprocess.Standardise(per="channel"),
    "mean_image": preprocess.SubtractMeanImage,
    "channel_mean": preprocess.SubtractChannelMean,
    "minmax": preprocess.MinMaxScale,
    "zca": preprocess.ZCAWhiten,
}


def augmentation(config: Config, train_images) -> augment.Compose | None:
    steps = []
    if config.flip:
        steps.append(augment.RandomFlip())
    if config.crop_padding:
        steps.append(augment.RandomCrop(padding=config.crop_padding))
    if config.rotation:
        steps.append(augment.RandomRotation(degrees=config.rotation))
    # photometric steps see [0, 255] pixels whether an earlier step left uint8 or float
    if config.colour_jitter:
        steps.append(augment.ColourJitter(scale=255.0))
    if config.fancy_pca:
        steps.append(augment.FancyPCA(std=config.fancy_pca, scale=255.0).fit(train_images))
    return augment.Compose(steps) if steps else None


class BatchPipeline:
    """augmentation (training only), then the fitted pre-processing: uint8 batch -> float32."""

    def __init__(self, augmentation, preprocessor):
        self.augmentation, self.preprocessor = augmentation, preprocessor

    def __call__(self, images, rng):
        if self.augmentation is not None:
            images = self.augmentation(images, rng)
        return self.preprocessor(images)

    def __repr__(self):
        return f"BatchPipeline({self.augmentation!r}, {self.preprocessor!r})"


def build(config: Config, train_x, train_y, eval_x=None, eval_y=None, classes: int | None = None):
    """(model, optimiser, schedule, train loader, evaluation loader, fitted pre-processor); the
    evaluation loader (of ``eval_x``, the validation set in ``run``) is None without images.
    The pre-processing is fitted on ``train_x`` only."""
    pycnn.manual_seed(config.seed)
    preprocessor = PREPROCESSORS[config.preprocess]().fit(train_x)
    pipeline = BatchPipeline(augmentation(config, train_x), preprocessor)
    sampler = data.BalancedSampler(train_y, mode=config.balance, seed=config.seed) \
        if config.balance != "none" else None
    train_loader = data.DataLoader((train_x, train_y), config.batch_size, shuffle=True, seed=config.seed,
                                   transform=pipeline, sampler=sampler, prefetch=config.prefetch)
    eval_loader = None
    if eval_x is not None and len(eval_x):
        eval_loader = data.DataLoader((eval_x, eval_y), 256, shuffle=False, transform=preprocessor, prefetch=0)
    if classes is None:
        classes = len(config.classes) or int(max(train_y.max(), eval_y.max() if eval_y is not None and len(eval_y)
                                                  else 0) + 1)
    model = models.build(model_spec(config, train_x.shape[1], train_x.shape[2], classes), seed=config.seed)
    optimiser = make_optimiser(config, model)
    schedule = {
        "none": lambda: schedules.ConstantLR(optimiser, warmup_steps=config.warmup_steps),
        "step": lambda: schedules.StepLR(optimiser, config.step_size, config.gamma, warmup_steps=config.warmup_steps),
        "cosine": lambda: schedules.CosineLR(optimiser, config.epochs, warmup_steps=config.warmup_steps),
        "plateau": lambda: schedules.ReduceOnPlateau(optimiser, factor=config.plateau_factor,
                                                     patience=config.patience, warmup_steps=config.warmup_steps),
    }[config.schedule]()
    return model, optimiser, schedule, train_loader, eval_loader, preprocessor


def make_optimiser(config: Config, model, regularise: bool = True):
    groups = optim.param_groups(model, weight_decay=config.weight_decay if regularise else 0.0,
                                l1=config.l1 if regularise else 0.0, max_norm=config.max_norm or None)
    if config.optimizer == "sgd":
        return optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov and config.momentum > 0)
    return optim.Adam(groups, lr=config.lr)


def model_spec(config: Config, in_channels: int, image_size: int, classes: int) -> dict:
    return {"name": "vgg", "in_channels": in_channels, "image_size": image_size, "classes": classes,
            "widths": list(config.widths), "convs_per_stage": config.convs_per_stage,
            "activation": config.activation, "batchnorm": config.batchnorm, "dropout": config.dropout,
            "hidden": config.hidden, "init_scheme": config.init}


# --------------------------------------------------------------------------------- runs

def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Make sure RUN_DIR can be written (RunDirError naming it otherwise); --resume needs it."""
    if resume and not run_dir.is_dir():
        raise RunDirError(f"--resume: the run directory {run_dir} does not exist (nothing to resume; leave out "
                          "--resume to start a new run)")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".pycnn-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"--run-dir: cannot write to {run_dir} ({exc.strerror or exc})") from None


def resume_from_newest(trainer: Trainer, run_dir: Path, log=print) -> Path | None:
    """Load the newest readable checkpoint of RUN_DIR into ``trainer``: an unreadable one is
    reported and the one before it tried.  None when there is no checkpoint at all."""
    found = list_checkpoints(run_dir / "checkpoints")
    for path in reversed(found):
        try:
            trainer.load_checkpoint(path)
            return path
        except CheckpointError as exc:
            log(f"warning: {exc}; trying the previous checkpoint")
    if found:
        raise RunDirError(f"--resume: none of the {len(found)} checkpoints in {run_dir / 'checkpoints'} could be "
                          "used (see the warnings above)")
    return None


def run(config: Config, run_dir, resume: bool = False, progress: bool = True, checks: bool = False,
        test: bool = True) -> dict:
    """Train ``config``, writing RUN_DIR (see the module docstring); returns the history.
    ``checks``: run the sanity checks of ``pycnn check`` first and print their block;
    ``test``: score the best epoch on the test set once at the end (not in cross-validation)."""
    run_dir = Path(run_dir)
    log = print if progress else (lambda *a, **k: None)
    splits = split_data(config)
    prepare_run_dir(run_dir, resume)
    if checks:
        from pycnn.training import checks as sanity
        report = sanity.run_checks(config, splits)
        log(report.block() + ("" if report.passed else "\n  training anyway: the fixes above are suggestions "
                                                         "(pycnn check exits with status 1 on this config)"))
    model, optimiser, schedule, train_loader, val_loader, preprocessor = build(
        config, splits.train_x, splits.train_y, splits.val_x, splits.val_y, classes=splits.classes)
    spec = model_spec(config, splits.train_x.shape[1], splits.train_x.shape[2], splits.classes)
    expected = "hinge loss about C - 1" if config.loss == "hinge" else f"ln {splits.classes} = {math.log(splits.classes):.4f}"

    def first_batch(data_loss, reg_loss):
        log(f"first batch: data loss {data_loss:.4f} (expected at the start: {expected}) + regularisation "
            f"{reg_loss:.4f}", flush=True)

    trainer = Trainer(model, optimiser, train_loader, val_loader, schedule=schedule, loss=config.loss,
                      label_smoothing=config.label_smoothing, checkpoint_dir=run_dir / "checkpoints",
                      progress=progress, device=config.device, early_stop=config.early_stop,
                      diagnostics_every=config.diagnostics_every, cuda_graph=config.cuda_graph,
                      meta={"model": spec, "config": config.to_dict()}, on_first_batch=first_batch,
                      attachments={f"preprocess/{k}": v for k, v in preprocessor.state_dict().items()})
    if resume:
        latest = resume_from_newest(trainer, run_dir, log)
        where = (f"inside epoch {trainer.epoch + 1}, after batch {trainer._position[0]}" if trainer._position else
                 f"after epoch {trainer.epoch}")
        log(f"resumed from {latest} ({where})" if latest else f"no checkpoint in {run_dir}: starting from the beginning")
    else:
        stale = list_checkpoints(run_dir / "checkpoints")
        for path in stale:
            path.unlink()
        if stale:
            log(f"new run in {run_dir}: removed its {len(stale)} old checkpoints (use --resume to continue a run)")
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    validation = (f"{len(splits.val_y)} validation (fold {config.fold + 1} of {config.folds})" if config.folds else
                  f"{len(splits.val_y)} validation (held out of the training set)" if len(splits.val_y) else
                  "no validation (val_size 0: the last epoch is kept)")
    log(f"pycnn {pycnn.__version__}: {config.dataset}, {len(splits.train_y)} training, {validation} and "
        f"{len(splits.test_y)} test images ({'touched once, at the end' if test else 'not used'})\n{model}")
    history = trainer.fit(config.epochs)
    if test and history["stopped"] is None and history["interrupted"] is None:
        history["test"] = score_on_test(trainer, config, splits, preprocessor)
    write_history(history, run_dir)
    from pycnn.training import figures, report
    figures.plot_history(history, run_dir)
    report.write_report(history, config.to_dict(), run_dir, classes=splits.classes)
    return history


def score_on_test(trainer: Trainer, config: Config, splits: Splits, preprocessor) -> dict:
    """Load the best epoch's weights and score them on the test set: the one use of it."""
    trainer.model.load_state_dict(trainer.best_state())
    loader = data.DataLoader((splits.test_x, splits.test_y), 256, shuffle=False, transform=preprocessor, prefetch=0)
    loss, accuracy = trainer.evaluate(loader)
    best = trainer.history["best_epoch"]
    return {"loss": loss, "accuracy": accuracy, "epoch": best, "images": int(len(splits.test_y)),
            "chosen_by": "validation accuracy" if trainer.val_loader is not None else "last epoch"}


def run_folds(config: Config, run_dir, resume: bool = False, progress: bool = True, checks: bool = False) -> dict:
    """k-fold cross-validation (``config.folds``): one run per fold in RUN_DIR/fold_I, each
    validating on its fold; returns (and writes to RUN_DIR/folds.json) the best validation
    accuracy of each fold with their mean and standard deviation.  The test set is not used."""
    if config.folds < 2:
        raise ConfigError(f"folds must be at least 2 for cross-validation, got {config.folds}")
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    scores, histories = [], []
    for fold in range(config.folds):
        fold_dir = run_dir / f"fold_{fold + 1}"
        history = run(dataclasses.replace(config, fold=fold), fold_dir, resume=resume and fold_dir.is_dir(),
                      progress=progress, checks=checks and fold == 0, test=False)
        histories.append(history)
        if history["interrupted"] is not None or history["stopped"] is not None:
            break
        scores.append(max(history["val_accuracy"]))
    summary = {"folds": config.folds, "val_accuracy": scores,
               "mean": statistics.fmean(scores) if scores else None,
               "std": statistics.stdev(scores) if len(scores) > 1 else None,
               "interrupted": histories[-1]["interrupted"], "stopped": histories[-1]["stopped"]}
    (run_dir / "folds.json").write_text(json.dumps(summary, indent=1))
    return summary


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


HISTORY_COLUMNS = ["epoch", "train_loss", "train_data_loss", "train_reg_loss", "train_accuracy", "val_loss",
                   "val_accuracy", "lr", "epoch_seconds", "images_per_second"]


def write_history(history: dict, run_dir: Path) -> None:
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_COLUMNS)
        for e in range(len(history["train_loss"])):
            writer.writerow([e + 1] + [history[c][e] if e < len(history.get(c, [])) else ""
                                       for c in HISTORY_COLUMNS[1:]])


def evaluate_checkpoint(path, dataset: str | None = None, split: str = "test") -> tuple[float, float]:
    """(loss, accuracy) of a checkpoint on a split ('test', 'val' or 'train') of the dataset it
    was trained on (``dataset`` overrides), with the pre-processing and the validation split
    recorded in it.  CheckpointError for an unreadable file, ConfigError for a dataset the
    model does not fit."""
    if split not in ("test", "val", "train"):
        raise ConfigError(f"split must be one of test, val, train; got {split!r}")
    arrays, meta = read_checkpoint(path)
    try:
        saved = meta["config"]
        spec = meta["model"]
        model = models.build(spec)
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        preprocessor = preprocess.from_state_dict(
            {k[len("preprocess/"):]: v for k, v in arrays.items() if k.startswith("preprocess/")})
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a usable pycnn checkpoint ({type(exc).__name__}: {exc})") from None
    config = Config.from_dict(saved, **({"dataset": dataset} if dataset else {}))
    splits = split_data(config)
    images, labels = {"test": (splits.test_x, splits.test_y), "val": (splits.val_x, splits.val_y),
                      "train": (splits.train_x, splits.train_y)}[split]
    shape = (spec.get("in_channels"), spec.get("image_size"))
    if images.shape[1:3] != shape or splits.classes > spec.get("classes", 0):
        raise ConfigError(f"dataset: the checkpoint's model takes {shape[0]}x{shape[1]}x{shape[1]} images of "
                          f"{spec.get('classes')} classes; {config.dataset} has {images.shape[1]}x{images.shape[2]}x"
                          f"{images.shape[3]} images of {splits.classes} classes")
    if not len(labels):
        raise ConfigError("split val: this run had no validation set (val_size 0)")
    loader = data.DataLoader((images, labels), 256, shuffle=False, transform=preprocessor, prefetch=0)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=1.0), loader, progress=False,
                      loss=saved.get("loss", "cross_entropy"))
    return trainer.evaluate(loader)
