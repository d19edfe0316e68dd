"""Class imbalance (the tips, "Miscellaneous"): long-tailed versions of a dataset and the
remedies, compared on the same long-tailed training set.

* ``long_tailed``: keep ``n_max * ratio ** (-i / (C - 1))`` images of the i-th class
  (``profile="exp"``, the long-tailed CIFAR-10 of Cui et al. 2019), or ``n_max`` for the first
  half of the classes and ``n_max / ratio`` for the rest (``profile="step"``); a seeded random
  subset of each class.  Only the training images become long-tailed: the validation set
  (held out before, stratified) and the test set keep their balance, as in the usual
  long-tailed CIFAR protocol, so the best epoch is chosen on balanced validation images and
  test accuracy equals the mean per-class accuracy.
* remedies: ``plain`` (nothing), ``upsample`` / ``downsample`` (class-balanced sampling:
  ``data.BalancedSampler``), ``weights`` (cross-entropy weighted per class: ``inverse``
  frequency, its square root ``sqrt``, or the ``effective`` number of samples of Cui et al.),
  and ``two-stage``: stage 1 trains on the classes with many images only, stage 2 continues
  from its best epoch on the classes with few images, plus ``replay`` images of each large
  class so that stage 2 does not forget them (``replay=0``: the tail classes alone, the
  literal reading of the tips).  The tips fine-tune a network pretrained elsewhere, where a
  small stage-2 rate fits; trained from scratch here, stage 1 never saw the small classes and
  stage 2 has to learn them, so it runs at the full rate for as many epochs as stage 1 by
  default (on long-tailed CIFAR-10, ratio 10, 8 + 8 epochs: a tenth of the rate for 4 epochs
  left the small classes at 12% accuracy, the full rate for 8 epochs at 46%).
* per remedy: per-class test accuracy and the confusion matrix (``confusion_REMEDY.png``),
  and one bar chart of all remedies per class (``per_class.png``); RUN_DIR/imbalance.json
  holds the numbers.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pycnn.training.config import Config
from pycnn.training.evaluation import class_names, confusion_matrix, per_class_accuracy
from pycnn.training.figures import plot_confusion
from pycnn.training.pipeline import split_data
from pycnn.training.rundir import make_writable_dir
from pycnn.training.tools import plots, raytune
from pycnn.training.tools import trial as trials

PROFILES = ("exp", "step")
REMEDIES = ("plain", "upsample", "downsample", "weights", "two-stage")
DEFAULT_REMEDIES = REMEDIES
WEIGHTS = ("inverse", "sqrt", "effective")


class ImbalanceError(ValueError):
    """Bad imbalance settings; the message names the argument."""


# ------------------------------------------------------------------------------ datasets

def long_tailed_counts(n_max: int, classes: int, ratio: float, profile: str = "exp") -> list:
    """Images per class, largest first: n_max down to n_max / ratio."""
    if profile not in PROFILES:
        raise ImbalanceError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if not ratio >= 1:
        raise ImbalanceError(f"--ratio must be >= 1 (largest class / smallest class), got {ratio}")
    if n_max < 1 or classes < 2:
        raise ImbalanceError(f"--per-class must be >= 1 and there must be 2 classes or more, got {n_max}, {classes}")
    if profile == "exp":
        counts = [n_max * ratio ** (-i / (classes - 1)) for i in range(classes)]
    else:
        counts = [n_max if i < classes // 2 else n_max / ratio for i in range(classes)]
    return [max(1, int(round(c))) for c in counts]


def long_tailed(labels: np.ndarray, ratio: float, profile: str = "exp", per_class: int | None = None,
                seed: int = 0, classes: int | None = None) -> np.ndarray:
    """Sorted indices of a long-tailed subset of ``labels``: class 0 keeps ``per_class``
    images (default: the size of the smallest class), the last class ``per_class / ratio``."""
    classes = classes or int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=classes)
    n_max = int(per_class or sizes.min())
    if n_max > sizes.min():
        raise ImbalanceError(f"--per-class: the largest class is to keep {n_max} images, but a class has only "
                             f"{sizes.min()} training images")
    counts = long_tailed_counts(n_max, classes, ratio, profile)
    rng = np.random.default_rng([seed, 0x1B])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)]
    return np.sort(np.concatenate(keep))


def long_tailed_splits(splits, ratio: float, profile: str = "exp", per_class: int | None = None, seed: int = 0):
    """``splits`` with a long-tailed training set; validation and test unchanged."""
    keep = long_tailed(splits.train_y, ratio, profile, per_class, seed, splits.classes)
    return splits._replace(train_x=splits.train_x[keep], train_y=splits.train_y[keep])


def class_weights(counts, kind: str = "inverse", beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights, scaled so that the mean weight over the training images is 1:
    ``inverse`` 1/n, ``sqrt`` 1/sqrt(n), ``effective`` (1 - beta) / (1 - beta**n)."""
    counts = np.asarray(counts, dtype=np.float64)
    if kind not in WEIGHTS:
        raise ImbalanceError(f"--class-weight must be one of {', '.join(WEIGHTS)}, got {kind!r}")
    safe = np.maximum(counts, 1)
    w = {"inverse": 1 / safe, "sqrt": 1 / np.sqrt(safe), "effective": (1 - beta) / (1 - beta ** safe)}[kind]
    w = np.where(counts > 0, w, 0.0)
    return (w * counts.sum() / (w * counts).sum()).astype(np.float32)


# ------------------------------------------------------------------------------ remedies

@dataclasses.dataclass
class Options:
    ratio: float = 10.0
    profile: str = "exp"
    per_class: int = 0                  # images of the largest class (0: the smallest class available)
    class_weight: str = "inverse"
    head: int = 0                       # two-stage: the classes with many images (0: those above the median)
    stage2_epochs: int = 0              # 0: as many as stage 1
    stage2_lr_factor: float = 1.0       # stage 2's learning rate as a share of the config's
    replay: int = -1                    # images of each large class in stage 2 (-1: the mean tail count)
    seed: int = 0

    def check(self) -> None:
        long_tailed_counts(max(self.per_class, 1), 2, self.ratio, self.profile)
        if self.class_weight not in WEIGHTS:
            raise ImbalanceError(f"--class-weight must be one of {', '.join(WEIGHTS)}, got {self.class_weight!r}")
        for name, value, low in (("--per-class", self.per_class, 0), ("--head", self.head, 0),
                                 ("--stage2-epochs", self.stage2_epochs, 0), ("--replay", self.replay, -1)):
            if value < low:
                raise ImbalanceError(f"{name} must be >= {low}, got {value}")
        if not 0 < self.stage2_lr_factor <= 1:
            raise ImbalanceError(f"--stage2-lr-factor must be in (0, 1], got {self.stage2_lr_factor}")


def make_splits(config: Config, options: Options):
    return long_tailed_splits(split_data(config), options.ratio, options.profile, options.per_class or None,
                              options.seed)


def head_classes(counts, head: int = 0) -> list:
    """The classes with many images: the ``head`` largest, or those above the median count."""
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    if head:
        if not head < len(counts):
            raise ImbalanceError(f"--head must be less than the number of classes ({len(counts)}), got {head}")
        return sorted(order[:head])
    median = float(np.median(counts))
    chosen = [c for c in order if counts[c] > median] or order[:1]
    return sorted(chosen[:len(counts) - 1])


def run_remedy(remedy: str, config: dict, options: dict, folder: str) -> dict:
    """Train one remedy on the long-tailed set and score its final model on the test set
    (once).  A Ray task or a local call."""
    clock = trials.timer()
    config, options = Config.from_dict(config), Options(**options)
    splits = make_splits(config, options)
    counts = np.bincount(splits.train_y, minlength=splits.classes)
    folder = Path(folder)
    reused = trials.read_outcome(folder / "stage2" if remedy == "two-stage" else folder) is not None
    extra = {}
    if remedy in ("upsample", "downsample"):
        outcome = trials.train_config(dataclasses.replace(config, balance=remedy), folder, splits=splits)
    elif remedy == "weights":
        weight = class_weights(counts, options.class_weight)
        extra["class_weight"] = [round(float(w), 4) for w in weight]
        outcome = trials.train_config(config, folder, splits=splits, class_weight=weight)
    elif remedy == "two-stage":
        outcome, extra = two_stage(config, splits, counts, options, folder)
    elif remedy == "plain":
        outcome = trials.train_config(config, folder, splits=splits)
    else:
        raise ImbalanceError(f"--remedies: unknown remedy {remedy!r}; use {', '.join(REMEDIES)}")
    if outcome.status == trials.INTERRUPTED:
        return {"remedy": remedy, "status": outcome.status, "reason": outcome.reason}
    if outcome.best_epoch is None:
        return {"remedy": remedy, "status": outcome.status, "reason": outcome.reason or "no epoch finished"}
    staged = remedy == "two-stage"
    warnings = [w for w in (extra.pop("stage1_warning", None),
                            not_converged(outcome, "stage 2" if staged else "", "--stage2-epochs" if staged else
                                          "--epochs")) if w]
    train_seconds = round(outcome.seconds + extra.pop("seconds", 0.0), 2)
    checkpoint = Path(extra.pop("folder", folder)) / outcome.best_checkpoint
    predictor = trials.load_predictor(checkpoint, remedy)
    predicted = predictor.probabilities(splits.test_x).argmax(axis=1)
    matrix = confusion_matrix(predicted, splits.test_y, splits.classes)
    per_class = per_class_accuracy(matrix)
    return {"remedy": remedy, "status": outcome.status, "reason": outcome.reason, "checkpoint": str(checkpoint),
            "val_accuracy": outcome.val_accuracy, "test_accuracy": float(np.trace(matrix) / matrix.sum()),
            "mean_per_class_accuracy": float(per_class.mean()), "per_class_accuracy": per_class.tolist(),
            "confusion": matrix.tolist(), "train_images": counts.tolist(),
            "train_seconds": train_seconds, "reused": reused,
            "seconds": round(train_seconds + clock() if reused else clock(), 2),
            "images_processed": int(outcome.images + extra.pop("images", 0)), "warnings": warnings, **extra}


def not_converged(outcome, stage: str = "", flag: str = "--epochs", rise: float = 0.005) -> str | None:
    """A warning when the validation accuracy was still rising at the last epoch (by more
    than ``rise``) and that epoch was the best: more epochs may change the result."""
    accuracies = [row["val_accuracy"] for row in outcome.curve or [] if row.get("val_accuracy") is not None]
    if len(accuracies) < 2 or outcome.best_epoch != len(accuracies) or accuracies[-1] - accuracies[-2] <= rise:
        return None
    rising = " -> ".join(f"{a:.3f}" for a in accuracies[-3:])
    return (f"{stage + ' ' if stage else ''}had not converged: its validation accuracy was still rising at its last "
            f"epoch ({rising}); more {flag} may change the scores")


def two_stage(config: Config, splits, counts, options: Options, folder: Path):
    """Stage 1 on the classes with many images; stage 2 from stage 1's best epoch on the
    classes with few (plus ``replay`` images per large class) at ``stage2_lr_factor`` x lr
    for ``stage2_epochs`` (a fresh schedule of the config's kind, without warm-up).
    Returns (stage 2's Outcome, facts about the stages)."""
    head = head_classes(counts, options.head)
    tail = [c for c in range(len(counts)) if c not in head]
    in_head = np.isin(splits.train_y, head)
    val_head = np.isin(splits.val_y, head)
    stage1 = splits._replace(train_x=splits.train_x[in_head], train_y=splits.train_y[in_head],
                             val_x=splits.val_x[val_head], val_y=splits.val_y[val_head])
    first = trials.train_config(config, folder / "stage1", splits=stage1)
    if first.status == trials.INTERRUPTED or first.best_epoch is None:
        return first, {"folder": str(folder / "stage1")}
    replay = options.replay if options.replay >= 0 else int(round(np.mean([counts[c] for c in tail])))
    rng = np.random.default_rng([options.seed, 0x2F])
    keep = [np.flatnonzero(~in_head)]
    keep += [rng.permutation(np.flatnonzero(splits.train_y == c))[:replay] for c in head]
    keep = np.sort(np.concatenate(keep))
    stage2 = splits._replace(train_x=splits.train_x[keep], train_y=splits.train_y[keep])
    best = trials.load_predictor(folder / "stage1" / first.best_checkpoint)
    second_config = dataclasses.replace(config, lr=config.lr * options.stage2_lr_factor, warmup_steps=0,
                                        epochs=options.stage2_epochs or config.epochs)
    second = trials.train_config(second_config, folder / "stage2", splits=stage2,
                                 init_state=best.model.state_dict(), preprocessor=best.preprocessor)
    facts = {"folder": str(folder / "stage2"), "stage1_warning": not_converged(first, "stage 1"),
             "head_classes": head, "tail_classes": tail, "replay_per_head_class":
             replay, "stage1": {"images": int(in_head.sum()), "epochs": first.epochs, "best_epoch": first.best_epoch,
                                "val_accuracy_head_classes": first.val_accuracy},
             "stage2": {"images": int(len(keep)), "epochs": second.epochs, "lr": second_config.lr},
             "seconds": first.seconds, "images": first.images}
    return second, facts


def _check_same_settings(run_dir: Path, settings: dict) -> None:
    """Rerunning the same command continues its remedies; other settings in the same folder
    would be scored with the old remedies' results: refused, naming what differs."""
    for name in ("settings.json", "imbalance.json"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
            saved = {"config": Config.from_dict(saved["config"]).to_dict(), "options": saved["options"]}
        except (OSError, ValueError, KeyError, TypeError):
            return
        differ = [f"{key} {settings[part][key]!r} (the folder's: {saved[part].get(key)!r})"
                  for part in ("config", "options") for key in settings[part]
                  if saved[part].get(key) != settings[part][key]]
        if differ:
            raise ImbalanceError(f"--run-dir: {run_dir} holds remedies trained with other settings "
                                 f"({', '.join(differ)}); rerunning continues them only with the same settings: "
                                 "choose another --run-dir")
        return


def run_imbalance(config: Config, options: Options, remedies, run_dir, *, backend: str = "local", ray_options=None,
                  log=print) -> dict:
    """Train every remedy on the same long-tailed set (in parallel on Ray with backend 'ray'),
    write RUN_DIR/imbalance.json and the figures, and print the comparison."""
    options.check()
    unknown = [r for r in remedies if r not in REMEDIES]
    if unknown or not remedies:
        raise ImbalanceError(f"--remedies: unknown {unknown or 'none given'}; use some of {', '.join(REMEDIES)}")
    splits = make_splits(config, options)
    counts = np.bincount(splits.train_y, minlength=splits.classes).tolist()
    run_dir = Path(run_dir).resolve()
    settings = {"config": config.to_dict(), "options": dataclasses.asdict(options)}
    _check_same_settings(run_dir, settings)
    make_writable_dir(run_dir)  # RunDirError (exit 2) when it cannot be written
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=1))
    (run_dir / "dataset.json").write_text(json.dumps({
        "dataset": config.dataset, "ratio": options.ratio, "profile": options.profile, "train_images_per_class":
        counts, "validation_images": int(len(splits.val_y)), "test_images": int(len(splits.test_y))}, indent=1))
    log(f"long-tailed {config.dataset} (ratio {options.ratio:g}, {options.profile}): training images per class "
        f"{counts}; {len(splits.val_y)} validation and {len(splits.test_y)} test images (balanced)", flush=True)
    jobs = [{"remedy": r, "config": config.to_dict(), "options": dataclasses.asdict(options),
             "folder": str(run_dir / r)} for r in remedies]
    if backend == "ray":
        results = raytune.run_jobs(run_remedy, jobs, log=log, **(ray_options or {}))
    else:
        results = []
        for job in jobs:
            log(f"  {job['remedy']} ...", flush=True)
            results.append(run_remedy(**job))
            if results[-1]["status"] == trials.INTERRUPTED:
                break
    interrupted = [r["remedy"] for r in results if r["status"] == trials.INTERRUPTED]
    if interrupted or len(results) < len(jobs):
        raise KeyboardInterrupt(f"interrupted during {interrupted or 'the remedies'}")
    names = class_names(config, splits.classes)
    scored = [r for r in results if "per_class_accuracy" in r]
    figures = [plots.per_class({r["remedy"]: r["per_class_accuracy"] for r in scored}, counts, names,
                               run_dir / "per_class.png")]
    for r in scored:
        figures.append(plot_confusion(np.array(r["confusion"]), names, run_dir / f"confusion_{r['remedy']}.png",
                                     f"{r['remedy']}: mean per-class accuracy {r['mean_per_class_accuracy']:.3f}"))
    plain = next((r for r in scored if r["remedy"] == "plain"), None)
    for r in scored:
        if plain is not None:
            r["gain_over_plain"] = r["mean_per_class_accuracy"] - plain["mean_per_class_accuracy"]
    report = {"dataset": json.loads((run_dir / "dataset.json").read_text()), "options": dataclasses.asdict(options),
              "config": config.to_dict(), "remedies": results, "figures": [str(f) for f in figures]}
    (run_dir / "imbalance.json").write_text(json.dumps(report, indent=1))
    log(table(results, counts))
    return report


def table(results: list, counts: list) -> str:
    few = [c for c in range(len(counts)) if counts[c] <= np.median(counts)]
    lines = ["| remedy | status | val acc | mean per-class acc | tail classes | worst class | vs plain | "
             "images processed | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "per_class_accuracy" not in r:
            lines.append(f"| {r['remedy']} | {r['status']}: {r['reason']} | | | | | | | |")
            continue
        acc = np.array(r["per_class_accuracy"])
        gain = r.get("gain_over_plain")
        lines.append(f"| {r['remedy']} | {r['status']} | {r['val_accuracy']:.4f} | {r['mean_per_class_accuracy']:.4f} "
                     f"| {acc[few].mean():.4f} | {acc.min():.4f} | {'' if gain is None else f'{100 * gain:+.2f}'} | "
                     f"{r['images_processed']} | {r['seconds']:.1f} |")
    notes = [f"note: {r['remedy']}: {w}" for r in results for w in r.get("warnings", ())]
    return "\n".join(lines) + ("\n(test accuracy on the balanced test set = mean per-class accuracy; 'vs plain' in "
                               "points; tail classes: those with at most the median number of training images; "
                               "seconds: each remedy's wall-clock time, training and scoring)") + \
        "".join(f"\n{n}" for n in notes)
