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
import statistics
from pathlib import Path

import pycnn
from pycnn import data
from pycnn.training import checks as sanity
from pycnn.training import figures, report
from pycnn.training.checkpoints import list_checkpoints
from pycnn.training.config import Config, ConfigError, check_device
from pycnn.training.pipeline import Splits, build, model_spec, split_data
from pycnn.training.rundir import check_run_dir, point_latest, prepare_run_dir, resume_from_newest, resume_plan
from pycnn.training.trainer import Trainer

__all__ = ["latest_checkpoint", "run", "run_folds", "score_on_test", "write_history"]

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
