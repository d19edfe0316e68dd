"""Training runs: one ``Config`` (flags of ``pycnn train``, or keys of a TOML file) describes
data, pre-processing, augmentation, model, optimizer, schedule and loss; ``run`` trains it
and writes a run directory:

    RUN_DIR/config.json            the config
    RUN_DIR/history.json, .csv     per-batch loss and learning rate, per-epoch loss (data +
                                   regularisation) / accuracy / lr / speed, the best epoch and
                                   the test result
    RUN_DIR/checkpoints/epoch_NNN.npz   model, optimizer, schedule, RNG, pre-processing
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
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import pycnn
from pycnn import data, models, optim, schedules
from pycnn.autograd import Tensor, no_grad
from pycnn.data import augment, datasets, preprocess
from pycnn.training import checks as sanity
from pycnn.training import figures, report
from pycnn.training.config import DEFAULT_VAL_FRACTION, Config, ConfigError, check_against_data, check_device
from pycnn.training.trainer import CheckpointError, Trainer, list_checkpoints, read_checkpoint

__all__ = ["Config", "ConfigError", "Evaluation", "RunDirError", "Splits", "best_checkpoint", "build",
           "check_run_dir", "evaluate", "evaluate_checkpoint", "load_data", "new_run_dir", "point_latest", "run",
           "run_folds", "split_data", "latest_checkpoint", "write_history"]

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
    """(model, optimizer, schedule, train loader, evaluation loader, fitted pre-processor); the
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
    optimizer = make_optimizer(config, model)
    schedule = {
        "none": lambda: schedules.ConstantLR(optimizer, warmup_steps=config.warmup_steps),
        "step": lambda: schedules.StepLR(optimizer, config.step_size, config.gamma, warmup_steps=config.warmup_steps),
        "cosine": lambda: schedules.CosineLR(optimizer, config.epochs, warmup_steps=config.warmup_steps),
        "plateau": lambda: schedules.ReduceOnPlateau(optimizer, factor=config.plateau_factor,
                                                     patience=config.patience, warmup_steps=config.warmup_steps),
    }[config.schedule]()
    return model, optimizer, schedule, train_loader, eval_loader, preprocessor


def make_optimizer(config: Config, model, regularise: bool = True):
    groups = optim.param_groups(model, weight_decay=config.weight_decay if regularise else 0.0,
                                l1=config.l1 if regularise else 0.0, max_norm=config.max_norm or None)
    if config.optimizer == "sgd":
        return optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov and config.momentum > 0)
    return optim.Adam(groups, lr=config.lr)


make_optimiser = make_optimizer  # the spelling tests/test_cuda_engine.py and tests/test_cuda_graph.py call


def model_spec(config: Config, in_channels: int, image_size: int, classes: int) -> dict:
    return {"name": "vgg", "in_channels": in_channels, "image_size": image_size, "classes": classes,
            "widths": list(config.widths), "convs_per_stage": config.convs_per_stage,
            "activation": config.activation, "batchnorm": config.batchnorm, "dropout": config.dropout,
            "hidden": config.hidden, "init_scheme": config.init}


# --------------------------------------------------------------------------------- runs

def run_contents(run_dir) -> list[str]:
    """What RUN_DIR holds of a run (its config, history, checkpoints, folds), in words; empty
    when there is nothing a new run would replace."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [name for name in ("config.json", "history.json", "folds.json") if (run_dir / name).is_file()]
    checkpoints = list((run_dir / "checkpoints").glob("*.npz")) if (run_dir / "checkpoints").is_dir() else []
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) != 1 else ''}")
    folds = sorted(p.name for p in run_dir.glob("fold_*") if p.is_dir() and run_contents(p))
    if folds:
        found.append(f"{len(folds)} fold run{'s' if len(folds) != 1 else ''}")
    return found


def check_run_dir(run_dir, resume: bool = False, overwrite: bool = False, *, command: str = "train") -> None:
    """Refuse (RunDirError, one line naming the flag) a RUN_DIR that a new run would replace,
    before anything is written: a folder that holds a run needs --resume or --overwrite; a
    path that cannot be made or written is named too.  Nothing is created here."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"--resume: the run directory {run_dir} does not exist (nothing to resume; leave out "
                              "--resume to start a new run)")
    elif not overwrite:
        found = run_contents(run_dir)
        if found:
            resumable = "continue it with --resume, " if command == "train" else ""
            raise RunDirError(f"--run-dir: {run_dir} already holds a run ({', '.join(found)}) and was left as it is: "
                              f"{resumable}replace it with --overwrite, or choose another --run-dir")
    check_writable(run_dir)


def check_writable(folder) -> None:
    """RunDirError naming FOLDER when it (or, where it does not exist yet, the folder it would
    be made in) is a file or cannot be written; nothing is created."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"--run-dir: cannot write to {folder} ({existing} is a file)")
    try:  # a file made and removed at once: permissions, read-only mounts and full disks alike
        with tempfile.TemporaryFile(dir=existing, prefix=".pycnn-write-test"):
            pass
    except OSError as exc:
        raise RunDirError(f"--run-dir: cannot write to {folder} ({existing}: {exc.strerror or exc})") from None


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Make RUN_DIR and its checkpoints/ folder and make sure they can be written (RunDirError
    naming it otherwise); --resume needs it to exist."""
    if resume and not run_dir.is_dir():
        raise RunDirError(f"--resume: the run directory {run_dir} does not exist (nothing to resume; leave out "
                          "--resume to start a new run)")
    make_writable_dir(run_dir)
    make_writable_dir(run_dir / "checkpoints")


def make_writable_dir(folder) -> None:
    """Make FOLDER (and its parents) and write a file into it: RunDirError naming it (exit 2 in
    the commands) when it cannot be made or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".pycnn-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"--run-dir: cannot write to {folder} ({exc.strerror or exc})") from None


RUNS_ROOT = Path("runs")


def new_run_dir(root=RUNS_ROOT) -> Path:
    """A folder name for a new run that no run uses yet: ROOT/YYYYMMDD-HHMMSS (-2, -3, ... when
    taken).  Nothing is created."""
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def point_latest(latest, run_dir, log=print) -> None:
    """Make the symbolic link LATEST (runs/latest) point at RUN_DIR, the newest run.  A LATEST
    that is a real folder (a run of an earlier pycnn) is left alone, and said."""
    latest, run_dir = Path(latest), Path(run_dir)
    if latest.exists() and not latest.is_symlink():
        log(f"note: {latest} is a folder, not a link (a run of an earlier pycnn): left as it is; this run is "
            f"{run_dir}")
        return
    target = os.path.relpath(run_dir.resolve(), latest.parent.resolve())
    temporary = latest.with_name(f".{latest.name}.{os.getpid()}")
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary, target_is_directory=True)
        os.replace(temporary, latest)
    except OSError as exc:  # a file system without links: the run is still where it is said to be
        temporary.unlink(missing_ok=True)
        log(f"note: could not point {latest} at {run_dir} ({exc.strerror or exc})")


# Settings a resumed run may change, and why that is safe; every other one is refused.
SAFE_ON_RESUME = {
    "device": "the remaining epochs run on the new device",
    "prefetch": "it changes how batches are prepared, not which",
    "diagnostics_every": "it changes what is recorded, not the training",
    "cuda_graph": "it replays the same steps",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "all"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _newest_meta(run_dir: Path) -> dict | None:
    """The meta of the newest readable checkpoint of RUN_DIR (None: there is none)."""
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return read_checkpoint(path)[1]
        except CheckpointError:
            continue  # resume_from_newest reports it
    return None


def resume_plan(config: Config, run_dir) -> tuple[list[str], dict | None]:
    """What resuming RUN_DIR with ``config`` does, before anything is loaded or written:
    (notes on the settings that change, each saying why that is safe; the run's history when
    it is finished and there is nothing to do, else None).  RunDirError naming the flags when
    ``config`` changes a setting a resumed run must keep, or shortens or stretches a cosine
    schedule (its epochs after the planned ones would train at rate 0)."""
    run_dir = Path(run_dir)
    meta = _newest_meta(run_dir)
    saved = meta.get("config") if meta else None
    if saved is None and (run_dir / "config.json").is_file():
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"--resume: {run_dir / 'config.json'} is unreadable ({exc})") from None
    if saved is None:
        return [], None
    try:
        old = Config.from_dict(saved).to_dict()
    except ConfigError as exc:
        raise RunDirError(f"--resume: the saved config of {run_dir} is not usable ({exc})") from None
    new = config.to_dict()
    changed = [name for name in new if old.get(name) != new[name]]
    refused = [name for name in changed if name not in SAFE_ON_RESUME and name != "epochs"]
    if refused:
        shown = ", ".join(f"{_flag(n)} {_typed(new[n])} (the run's: {_typed(old[n])})" for n in refused)
        raise RunDirError(f"--resume: {shown} would change the run in {run_dir}, which keeps its settings (only "
                          f"--epochs, {', '.join(_flag(n) for n in SAFE_ON_RESUME)} may change): start a new run "
                          "to train with other settings")
    done = int(meta["epoch"]) if meta else 0
    inside = bool(meta and meta.get("position"))
    notes = [f"{_flag(n)} {_typed(new[n])} (the run's: {_typed(old[n])}): {SAFE_ON_RESUME[n]}"
             for n in changed if n in SAFE_ON_RESUME]
    if "epochs" in changed:
        if new["epochs"] < done + inside:
            raise RunDirError(f"--resume: --epochs {new['epochs']}: the run in {run_dir} has already trained "
                              f"{done} epoch{'s' if done != 1 else ''}{' and part of the next' if inside else ''}")
        if config.schedule == "cosine":
            raise RunDirError(f"--resume: --epochs {new['epochs']}: the run's cosine schedule is laid out over its "
                              f"{old['epochs']} epochs (the rate reaches 0 at the last), so resuming cannot "
                              f"{'stretch' if new['epochs'] > old['epochs'] else 'shorten'} it; start a new run "
                              f"with --epochs {new['epochs']} (or fine-tune this one: pycnn finetune)")
        notes.append(f"--epochs {new['epochs']} (the run's: {old['epochs']}): the {config.schedule} schedule "
                     f"continues as it would have; training until epoch {new['epochs']}")
    history_path = run_dir / "history.json"
    early = meta and meta["history"].get("early_stopped")
    if meta and not inside and (done >= config.epochs or early) and history_path.is_file():
        try:
            history = json.loads(history_path.read_text())
        except (OSError, ValueError):
            return notes, None  # rewritten by the resumed run
        if history.get("interrupted") is None and len(history.get("train_loss", ())) >= done:
            why = f"early stopped: {early}" if early else f"all {done} of its epochs are trained"
            history["nothing_to_do"] = (f"{run_dir} is finished ({why}); its files are left as they are (more "
                                        f"epochs: --resume --epochs N, where its schedule allows)")
            return notes, history
    return notes, None


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
        test: bool = True, overwrite: bool = False, latest=None) -> dict:
    """Train ``config``, writing RUN_DIR (see the module docstring); returns the history.
    A RUN_DIR that holds a run is refused (RunDirError) unless ``resume`` (continue it: see
    ``resume_plan`` for the settings that may change; a finished run is returned as it is,
    with ``history["nothing_to_do"]`` saying so) or ``overwrite`` (its checkpoints are
    deleted).  ``checks``: run the sanity checks of ``pycnn check`` first and print their
    block; ``test``: score the best epoch on the test set once at the end (not in
    cross-validation); ``latest``: a symbolic link to point at RUN_DIR once it is made."""
    run_dir = Path(run_dir)
    log = print if progress else (lambda *a, **k: None)
    check_run_dir(run_dir, resume, overwrite)
    check_device(config.device)
    notes = []
    if resume:
        notes, finished = resume_plan(config, run_dir)
        if finished is not None:
            return finished
    splits = split_data(config)
    prepare_run_dir(run_dir, resume)
    if latest is not None:
        point_latest(latest, run_dir, log)
    if checks:
        checked = sanity.run_checks(config, splits)
        log(checked.block() + ("" if checked.passed else "\n  training anyway: the fixes above are suggestions "
                                                         "(pycnn check exits with status 1 on this config)"))
    model, optimizer, schedule, train_loader, val_loader, preprocessor = build(
        config, splits.train_x, splits.train_y, splits.val_x, splits.val_y, classes=splits.classes)
    spec = model_spec(config, splits.train_x.shape[1], splits.train_x.shape[2], splits.classes)
    expected = ("hinge loss about C - 1" if config.loss == "hinge" else
                f"ln {splits.classes} = {math.log(splits.classes):.4f}")

    def first_batch(data_loss, reg_loss):
        log(f"first batch: data loss {data_loss:.4f} (expected at the start: {expected}) + regularisation "
            f"{reg_loss:.4f}", flush=True)

    trainer = Trainer(model, optimizer, train_loader, val_loader, schedule=schedule, loss=config.loss,
                      label_smoothing=config.label_smoothing, checkpoint_dir=run_dir / "checkpoints",
                      progress=progress, device=config.device, early_stop=config.early_stop,
                      diagnostics_every=config.diagnostics_every, cuda_graph=config.cuda_graph,
                      meta={"model": spec, "config": config.to_dict()}, on_first_batch=first_batch,
                      attachments={f"preprocess/{k}": v for k, v in preprocessor.state_dict().items()})
    if resume:
        latest_path = resume_from_newest(trainer, run_dir, log)
        where = (f"inside epoch {trainer.epoch + 1}, after batch {trainer._position[0]}" if trainer._position else
                 f"after epoch {trainer.epoch}")
        log(f"resumed from {latest_path} ({where})" if latest_path else
            f"no checkpoint in {run_dir}: starting from the beginning")
        for note in notes:
            log(f"changed on resume: {note}")
    elif overwrite:
        replaced = list_checkpoints(run_dir / "checkpoints")
        for path in replaced:
            path.unlink()
        if replaced:
            log(f"--overwrite: deleted the {len(replaced)} checkpoints of the run that was in {run_dir}")
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    validation = (f"{len(splits.val_y)} validation (fold {config.fold + 1} of {config.folds})" if config.folds else
                  f"{len(splits.val_y)} validation (held out of the training set)" if len(splits.val_y) else
                  "no validation (val_size 0: the last epoch is kept)")
    log(f"pycnn {pycnn.__version__}: {config.dataset}, {len(splits.train_y)} training, {validation} and "
        f"{len(splits.test_y)} test images ({'touched once, at the end' if test else 'not used'}); run directory "
        f"{run_dir}" + ("\nthe best epoch, marked (best): the highest validation accuracy (ties: the lower validation "
                        "loss)" if len(splits.val_y) else "") + f"\n{model}")
    history = trainer.fit(config.epochs)
    if test and history["stopped"] is None and history["interrupted"] is None:
        history["test"] = score_on_test(trainer, config, splits, preprocessor)
    write_history(history, run_dir)
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


def run_folds(config: Config, run_dir, resume: bool = False, progress: bool = True, checks: bool = False,
              overwrite: bool = False, latest=None) -> dict:
    """k-fold cross-validation (``config.folds``): one run per fold in RUN_DIR/fold_I, each
    validating on its fold; returns (and writes to RUN_DIR/folds.json) the best validation
    accuracy of each fold with their mean and standard deviation.  The test set is not used.
    RUN_DIR, ``resume``, ``overwrite`` and ``latest`` as in ``run``."""
    if config.folds < 2:
        raise ConfigError(f"folds must be at least 2 for cross-validation, got {config.folds}")
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume, overwrite)
    check_device(config.device)
    if resume and (run_dir / "config.json").is_file():
        resume_plan(config, run_dir)  # refuses changed settings
    prepare_run_dir(run_dir, resume)
    if latest is not None:
        point_latest(latest, run_dir, progress and print or (lambda *a, **k: None))
    scores, histories = [], []
    for fold in range(config.folds):
        fold_dir = run_dir / f"fold_{fold + 1}"
        history = run(dataclasses.replace(config, fold=fold), fold_dir, resume=resume and fold_dir.is_dir(),
                      progress=progress, checks=checks and fold == 0, test=False, overwrite=overwrite)
        histories.append(history)
        if history["interrupted"] is not None or history["stopped"] is not None:
            break
        scores.append(max(history["val_accuracy"]))
    summary = {"folds": config.folds, "val_accuracy": scores,
               "mean": statistics.fmean(scores) if scores else None,
               "std": statistics.stdev(scores) if len(scores) > 1 else None,
               "interrupted": histories[-1]["interrupted"], "stopped": histories[-1]["stopped"]}
    if all(h.get("nothing_to_do") for h in histories) and len(histories) == config.folds:
        summary["nothing_to_do"] = f"{run_dir} is finished (all {config.folds} folds); its files are left as they are"
        return summary
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
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
    """(loss, accuracy) of a checkpoint (or a run directory's best one) on a split; see
    ``evaluate``."""
    result = evaluate(path, dataset, split)
    return result.loss, result.accuracy


def confusion_matrix(predicted, labels, classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    return np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)


def class_names(config: Config, classes: int) -> list[str]:
    """The names of labels 0..classes-1 of a run: its ``classes`` (the original labels) when it
    chose some, CIFAR-10's words for cifar10."""
    original = list(config.classes) or list(range(classes))
    if config.dataset == "cifar10":
        return [datasets.CIFAR10_CLASSES[i] for i in original]
    return [str(i) for i in original]


def best_checkpoint(path) -> Path:
    """The checkpoint PATH names: PATH itself when it is a file; for a run directory, its best
    epoch's checkpoint by validation (history.json's best epoch, else the newest checkpoint's).
    CheckpointError naming PATH when it holds none."""
    path = Path(path)
    if not path.is_dir():
        return path
    if run_contents(path) and not list_checkpoints(path / "checkpoints") and list(path.glob("fold_*")):
        raise CheckpointError(f"{path} is a cross-validation run: evaluate one fold's run directory, such as "
                              f"{path / 'fold_1'}")
    best = None
    if (path / "history.json").is_file():
        try:
            best = json.loads((path / "history.json").read_text()).get("best_epoch")
        except (OSError, ValueError):
            best = None
    if best is None:
        meta = _newest_meta(path)
        best = meta["history"].get("best_epoch") if meta else None
    if best is None:
        raise CheckpointError(f"{path} holds no finished epoch's checkpoint: expected a run directory (pycnn train "
                              "--run-dir) or a checkpoint file")
    chosen = path / "checkpoints" / f"epoch_{int(best):03d}.npz"
    if not chosen.is_file():
        raise CheckpointError(f"{path}: the best epoch's checkpoint {chosen} is missing; name a checkpoint file")
    return chosen


@dataclasses.dataclass
class Evaluation:
    """A checkpoint scored on a split: loss, accuracy, the confusion matrix (rows: true class,
    columns: predicted) and the names of the classes."""
    checkpoint: Path
    epoch: int
    best_epoch: int | None
    dataset: str
    split: str
    loss: float
    accuracy: float
    matrix: np.ndarray
    names: list

    @property
    def images(self) -> int:
        return int(self.matrix.sum())

    @property
    def per_class(self) -> np.ndarray:
        return per_class_accuracy(self.matrix)

    def summary(self) -> str:
        which = ("the best epoch by validation accuracy" if self.epoch == self.best_epoch else
                 f"the run's best by validation was epoch {self.best_epoch}" if self.best_epoch else "")
        lines = [f"{self.checkpoint} (epoch {self.epoch}{': ' + which if which else ''}): {self.dataset} {self.split}, "
                 f"{self.images} images: loss {self.loss:.4f}, accuracy {self.accuracy:.4f}",
                 "per-class accuracy (images):"]
        counts = self.matrix.sum(axis=1)
        width = max(len(n) for n in self.names)
        for name, accuracy, count in zip(self.names, self.per_class, counts):
            lines.append(f"  {name:>{width}}  {accuracy:.4f} ({count})")
        cell = max(4, len(str(int(self.matrix.max(initial=0)))) + 1, *(len(n) + 1 for n in self.names))
        lines.append("confusion matrix (rows: true class, columns: predicted):")
        lines.append(" " * (width + 2) + "".join(f"{n:>{cell}}" for n in self.names))
        for name, row in zip(self.names, self.matrix):
            lines.append(f"  {name:>{width}}" + "".join(f"{int(v):>{cell}}" for v in row))
        return "\n".join(lines)


def evaluate(path, dataset: str | None = None, split: str = "test") -> Evaluation:
    """Score a checkpoint (or a run directory's best one, ``best_checkpoint``) on a split
    ('test', 'val' or 'train') of the dataset it was trained on (``dataset`` overrides), with
    the pre-processing and the validation split recorded in it.  CheckpointError for an
    unreadable file, ConfigError for a dataset the model does not fit."""
    if split not in ("test", "val", "train"):
        raise ConfigError(f"split must be one of test, val, train; got {split!r}")
    path = best_checkpoint(path)
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
    model.eval()
    total, predicted = 0.0, []
    with no_grad():
        for batch, batch_labels in loader:
            logits = model(Tensor(batch))
            total += trainer.loss(logits, batch_labels).item() * len(batch_labels)
            predicted.append(np.asarray(logits.data).argmax(axis=1))
    predicted = np.concatenate(predicted)
    classes = int(spec.get("classes", splits.classes))
    matrix = confusion_matrix(predicted, labels, classes)
    return Evaluation(checkpoint=path, epoch=int(meta["epoch"]), best_epoch=meta["history"].get("best_epoch"),
                      dataset=config.dataset, split=split, loss=total / len(labels),
                      accuracy=float((predicted == labels).mean()), matrix=matrix,
                      names=class_names(config, classes))


def figure_path(evaluation: Evaluation) -> Path:
    """Where ``pycnn evaluate`` draws the confusion matrix: in the checkpoint's run directory
    (beside checkpoints/), named after the split and the checkpoint."""
    folder = evaluation.checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"confusion_{evaluation.split}_{evaluation.checkpoint.stem}.png"
