"""Ensembles of networks (the tips, section 8) and test-time augmentation.

Members come from any mix of four sources:

* ``seeds``: the same config trained with different seeds (different initialisations and
  batch orders), trained in parallel (Ray tasks, or one after another in this process);
* ``search``: the top-k trials of a ``pycnn search`` by validation accuracy (their best
  epochs): no retraining;
* ``run``: the last k epoch checkpoints of one run (``pycnn train``'s checkpoints): no
  retraining;
* ``snapshots``: one run with a cyclic cosine schedule (restarted every ``cycle_epochs``;
  Huang et al. 2017, snapshot ensembles), whose end-of-cycle checkpoints are the members.

The ensemble averages the members' class probabilities (majority vote is reported beside it,
ties going to the higher average probability).  Test-time augmentation (``tta``) is an
ensemble over views of each test image — the identity, the mirror image and shifted crops
(zero padding, as ``augment.RandomCrop``) — whose probabilities each member averages first.

Each member's and the ensemble's test accuracy and expected calibration error (ECE, 15 equal
bins of the top probability) are reported; the members are chosen without the test set
(search trials by validation accuracy), which is read once per member and per view.
Everything goes to RUN_DIR/ensemble.json and RUN_DIR/calibration.png; trained members live in
RUN_DIR/members/ (rerunning the same command reuses or resumes them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from pycnn import schedules
from pycnn.training.checkpoints import list_checkpoints
from pycnn.training.config import Config, ConfigError
from pycnn.training.pipeline import split_data, warmup_steps
from pycnn.training.rundir import check_writable, make_writable_dir
from pycnn.training.tools import plots, raytune
from pycnn.training.tools import trial as trials

ECE_BINS = 15


class EnsembleError(ValueError):
    """An ensemble cannot be built as asked; the message names the argument."""


class EnsembleInterrupted(RuntimeError):
    """Ctrl-C while members trained: rerunning the same command continues them."""


# --------------------------------------------------------------------------- cyclic schedule

class CyclicCosine(schedules.Schedule):
    """Cosine annealing from the full rate to 0 within each cycle of ``steps_per_cycle``
    batches, then a restart at the full rate (per batch, after any warm-up)."""

    def __init__(self, optimizer, steps_per_cycle: int, warmup_steps: int = 0):
        if steps_per_cycle < 1:
            raise ValueError(f"steps_per_cycle must be >= 1, got {steps_per_cycle}")
        self.steps_per_cycle = int(steps_per_cycle)
        super().__init__(optimizer, warmup_steps)

    def step_batch(self) -> None:
        self.batch += 1
        t = (self.batch % self.steps_per_cycle) / self.steps_per_cycle
        self.factor = 0.5 * (1 + math.cos(math.pi * t))
        self._apply()


# ------------------------------------------------------------------------------- training

def train_member(config: dict, folder: str, cycle_epochs: int = 0) -> dict:
    """Train one member (a Ray task or a local call); with ``cycle_epochs`` a snapshot run
    keeping every epoch's checkpoint.  Returns the Outcome as a dict."""
    config = Config.from_dict(config)
    schedule = None
    if cycle_epochs:
        splits = split_data(config)
        per_epoch = math.ceil(len(splits.train_y) / config.batch_size)
        schedule = lambda opt: CyclicCosine(opt, cycle_epochs * per_epoch, warmup_steps(config, per_epoch))  # noqa: E731
    else:
        splits = None
    meta = {"schedule": f"cyclic cosine, restarted every {cycle_epochs} epochs"} if cycle_epochs else None
    return trials.train_config(config, folder, splits=splits, schedule=schedule, keep="all" if cycle_epochs else
                               "best", meta=meta).to_dict()


@dataclasses.dataclass
class Member:
    name: str
    kind: str            # seed | search | run | snapshot
    checkpoint: str
    val_accuracy: float | None = None
    train_seconds: float = 0.0
    train_images: int = 0


def _check_folder(folder: Path, config: Config) -> None:
    saved = folder / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(config.to_dict())):
        raise EnsembleError(f"--run-dir: {folder} holds a member trained with other settings; choose another "
                            "--run-dir (or rerun with the settings it was made with)")


def train_members(config: Config, seeds: int, snapshots: int, cycle_epochs: int, run_dir: Path, backend: str,
                  ray_options: dict | None, log=print) -> list:
    """Train ``seeds`` members with seeds config.seed + i, and one snapshot run of
    ``snapshots`` cycles; in parallel on Ray with backend 'ray'."""
    jobs, kinds = [], []
    for i in range(seeds):
        member = dataclasses.replace(config, seed=config.seed + i)
        folder = run_dir / "members" / f"seed_{member.seed}"
        _check_folder(folder, member)
        jobs.append({"config": member.to_dict(), "folder": str(folder)})
        kinds.append("seed")
    if snapshots:
        snap = dataclasses.replace(config, epochs=snapshots * cycle_epochs, schedule="none")
        folder = run_dir / "members" / "snapshots"
        _check_folder(folder, snap)
        jobs.append({"config": snap.to_dict(), "folder": str(folder), "cycle_epochs": cycle_epochs})
        kinds.append("snapshots")
    if not jobs:
        return []
    log(f"training {seeds} seed members{f' and a snapshot run of {snapshots} cycles' if snapshots else ''} "
        f"({config.epochs if seeds else snapshots * cycle_epochs} epochs each)", flush=True)
    if backend == "ray":
        outcomes = raytune.run_jobs(train_member, jobs, log=log, **(ray_options or {}))
    else:
        outcomes = []
        for job in jobs:
            outcomes.append(train_member(**job))
            if outcomes[-1]["status"] == trials.INTERRUPTED:
                raise EnsembleInterrupted(outcomes[-1]["reason"])
    members = []
    for job, kind, o in zip(jobs, kinds, outcomes):
        o = trials.Outcome.from_dict(o)
        if o.status != trials.FINISHED or o.best_epoch is None:
            raise EnsembleError(f"member {job['folder']} did not finish ({o.status}: {o.reason}); lower --lr")
        folder = Path(job["folder"])
        if kind == "seed":
            members.append(Member(folder.name, "seed", str(folder / o.best_checkpoint), o.val_accuracy, o.seconds,
                                  o.images))
            continue
        for k in range(1, snapshots + 1):
            epoch = k * cycle_epochs
            row = o.curve[epoch - 1]
            members.append(Member(f"snapshot_{k}", "snapshot", str(folder / "checkpoints" / f"epoch_{epoch:03d}.npz"),
                                  row["val_accuracy"], o.seconds / snapshots, o.images // snapshots))
    return members


# ----------------------------------------------------------------------- members on disk

def search_members(search_dir, top: int) -> list:
    """The ``top`` trials of a pycnn search by validation accuracy (their best epochs)."""
    search_dir = Path(search_dir)
    plans = sorted(search_dir.glob("stage_*/plan.json"))
    if not plans:
        raise EnsembleError(f"--from-search: {search_dir} holds no pycnn search (no stage_*/plan.json)")
    scored = []
    for plan in plans:
        for t in json.loads(plan.read_text())["trials"]:
            o = trials.read_outcome(t["folder"])
            if o is not None and o.best_epoch is not None and o.val_accuracy is not None:
                scored.append((o.val_accuracy, -(o.val_loss or 0), t, o))
    if len(scored) < top:
        raise EnsembleError(f"--top: the search in {search_dir} has {len(scored)} scored trials, fewer than {top}")
    scored.sort(key=lambda s: s[:2], reverse=True)
    return [Member(f"search_s{t['stage']}t{t['index']:03d}", "search", str(Path(t["folder"]) / o.best_checkpoint),
                   o.val_accuracy, o.seconds, o.images) for _, _, t, o in scored[:top]]


def run_members(run_dir, last: int) -> list:
    """The last ``last`` end-of-epoch checkpoints of a run folder."""
    folder = Path(run_dir)
    found = [p for p in list_checkpoints(folder / "checkpoints") if "_part_" not in p.name]
    if not found:
        raise EnsembleError(f"--from-run: {folder} has no checkpoints (expected {folder}/checkpoints/epoch_NNN.npz)")
    if len(found) < last:
        raise EnsembleError(f"--last: {folder} has {len(found)} epoch checkpoints, fewer than {last}")
    history = folder / "history.json"
    val = json.loads(history.read_text()).get("val_accuracy", []) if history.is_file() else []
    members = []
    for path in found[-last:]:
        epoch = int(path.stem.split("_")[1])
        members.append(Member(f"{folder.name}_epoch_{epoch}", "run", str(path),
                              val[epoch - 1] if epoch - 1 < len(val) else None))
    return members


# ------------------------------------------------------------------------ views and scores

VIEWS = ("flip", "crop")


def tta_views(names, padding: int) -> list:
    """(name, function on uint8 images) pairs: the identity, then for 'flip' the mirror image,
    for 'crop' four crops of the image zero-padded by ``padding``, shifted up, down, left and
    right by ``padding`` pixels, and with both the mirror images of those crops too.  By
    default (``pycnn ensemble --tta``) the views follow the members' training augmentation:
    crops shifted by half its crop padding (1 pixel at least), and flips only when it flipped
    (a mirrored digit is another digit)."""
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise EnsembleError(f"--tta-views: unknown views {unknown}; use {', '.join(VIEWS)}")
    shifts = [(0, 0)]
    if "crop" in names:
        if padding < 1:
            raise EnsembleError(f"--tta-padding must be at least 1 for crop views, got {padding}")
        shifts += [(-padding, 0), (padding, 0), (0, -padding), (0, padding)]
    flips = [False, True] if "flip" in names else [False]
    views = []
    for flip in flips:
        for dy, dx in shifts:
            name = ("flip" if flip else "") + (f"shift{dy:+d}{dx:+d}" if (dy, dx) != (0, 0) else "")
            views.append((name or "identity", lambda x, f=flip, dy=dy, dx=dx: _view(x, f, dy, dx)))
    return views


def _view(x, flip: bool, dy: int, dx: int):
    if flip:
        x = x[..., ::-1]
    if dy or dx:
        p = max(abs(dy), abs(dx))
        h, w = x.shape[2:]
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        x = padded[:, :, p + dy:p + dy + h, p + dx:p + dx + w]
    return np.ascontiguousarray(x)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over equal-width bins of the top probability: |bin| / N * |accuracy - confidence|."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def majority_vote(probs: np.ndarray) -> np.ndarray:
    """(members, N, C) -> (N,) the class most members predict; ties: the higher mean probability."""
    votes = np.zeros(probs.shape[1:])
    np.add.at(votes, (np.arange(probs.shape[1])[None, :].repeat(len(probs), 0), probs.argmax(axis=2)), 1.0)
    return (votes + 1e-6 * probs.mean(axis=0)).argmax(axis=1)


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()
    return {"test_accuracy": float((probs.argmax(axis=1) == labels).mean()),
            "ece": expected_calibration_error(probs, labels), "nll": float(nll)}


# --------------------------------------------------------------------------------- the run

def _check_same_test_set(config: Config, where, other: Config, other_where) -> None:
    """Members are scored on one test set: the same dataset and classes."""
    if (config.dataset, config.classes) != (other.dataset, other.classes):
        raise EnsembleError(f"members must share a test set: {where} was trained on {config.dataset} classes "
                            f"{list(config.classes) or 'all'}, {other_where} on {other.dataset} classes "
                            f"{list(other.classes) or 'all'}")


def evaluate(members: list, run_dir, views=None, log=print) -> dict:
    """Score each member and the ensemble on the test set (with the TTA ``views``);
    writes RUN_DIR/ensemble.json and RUN_DIR/calibration.png and returns the report."""
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)} (--members, --top, --last, "
                            "--snapshots)")
    predictors = [trials.load_predictor(m.checkpoint, m.name) for m in members]
    first = predictors[0].config
    for p in predictors[1:]:
        _check_same_test_set(p.config, p.path, first, predictors[0].path)
    test = split_data(first)
    images, labels = test.test_x, test.test_y
    views = views or [("identity", lambda x: x)]
    start = time.perf_counter()
    plain, tta = [], []
    for predictor in predictors:
        per_view = np.stack([predictor.probabilities(view(images)) for _, view in views])
        plain.append(per_view[0])
        tta.append(per_view.mean(axis=0))
    predict_seconds = time.perf_counter() - start
    plain, tta = np.stack(plain), np.stack(tta)
    use = tta if len(views) > 1 else plain
    rows = []
    for i, m in enumerate(members):
        row = {"name": m.name, "kind": m.kind, "checkpoint": m.checkpoint, "val_accuracy": m.val_accuracy,
               **_scores(use[i], labels)}
        if len(views) > 1:
            row["test_accuracy_without_tta"] = _scores(plain[i], labels)["test_accuracy"]
        rows.append(row)
    ensemble = {"members": len(members), "combine": "average of probabilities", **_scores(use.mean(axis=0), labels),
                "vote_accuracy": float((majority_vote(use) == labels).mean())}
    if len(views) > 1:
        ensemble["test_accuracy_without_tta"] = _scores(plain.mean(axis=0), labels)["test_accuracy"]
    best_test = max(rows, key=lambda r: r["test_accuracy"])
    scored = [r for r in rows if r["val_accuracy"] is not None]
    best_val = max(scored, key=lambda r: r["val_accuracy"]) if scored else None
    confidence = use.mean(axis=0).max(axis=1)
    ensemble["mean_confidence"] = float(confidence.mean())
    report = {
        "members": rows, "ensemble": ensemble, "test_images": int(len(labels)),
        "tta": {"views": [name for name, _ in views]},
        "best_member": {"by_test_accuracy": best_test["name"], "test_accuracy": best_test["test_accuracy"],
                        "by_val_accuracy": best_val["name"] if best_val else None},
        "margin_over_best_member": ensemble["test_accuracy"] - best_test["test_accuracy"],
        "calibration": calibration_in_words(ensemble["test_accuracy"], ensemble["mean_confidence"], ensemble["ece"]),
        "cost": {"train_seconds": round(sum(m.train_seconds for m in members), 1),
                 "train_images": int(sum(m.train_images for m in members)),
                 "predict_seconds": round(predict_seconds, 2),
                 "forward_images": int(len(members) * len(views) * len(labels)),
                 "forward_images_one_model": int(len(labels))},
    }
    if len(views) > 1:  # the same comparison without test-time augmentation
        best_plain = max(rows, key=lambda r: r["test_accuracy_without_tta"])
        report["best_member_without_tta"] = {"by_test_accuracy": best_plain["name"],
                                             "test_accuracy": best_plain["test_accuracy_without_tta"]}
        report["margin_over_best_member_without_tta"] = (ensemble["test_accuracy_without_tta"] -
                                                         best_plain["test_accuracy_without_tta"])
    run_dir = Path(run_dir)
    make_writable_dir(run_dir)
    plots.reliability(confidence, use.mean(axis=0).argmax(axis=1) == labels, ECE_BINS, run_dir / "calibration.png",
                      f"ensemble of {len(members)}: ECE {ensemble['ece']:.3f}")
    (run_dir / "ensemble.json").write_text(json.dumps(report, indent=1))
    log(table(report))
    return report


def calibration_in_words(accuracy: float, mean_confidence: float, ece: float) -> str:
    """The reliability diagram in one sentence: calibrated, under- or over-confident."""
    if ece < 0.02:
        return (f"well calibrated (ECE {ece:.3f}): its confidence matches its accuracy within "
                f"{100 * ece:.1f} points")
    if accuracy > mean_confidence:
        return (f"under-confident (ECE {ece:.3f}): its mean confidence {mean_confidence:.3f} is below its accuracy "
                f"{accuracy:.3f} (averaging spreads the probabilities; the predicted classes are not affected, and "
                "a temperature fitted on the validation set would sharpen them)")
    return (f"over-confident (ECE {ece:.3f}): its mean confidence {mean_confidence:.3f} is above its accuracy "
            f"{accuracy:.3f} (do not read its probabilities as chances; a temperature fitted on the validation set "
            "would soften them)")


def table(report: dict) -> str:
    tta = len(report["tta"]["views"]) > 1
    head = "| member | kind | val acc | test acc" + (" (TTA) | test acc (no TTA)" if tta else "") + " | ECE |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["members"]:
        val = "" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
        extra = f" | {r['test_accuracy_without_tta']:.4f}" if tta else ""
        lines.append(f"| {r['name']} | {r['kind']} | {val} | {r['test_accuracy']:.4f}{extra} | {r['ece']:.4f} |")
    e = report["ensemble"]
    extra = f" | {e['test_accuracy_without_tta']:.4f}" if tta else ""
    lines.append(f"| ensemble (average) | {e['members']} members | | {e['test_accuracy']:.4f}{extra} | "
                 f"{e['ece']:.4f} |")
    lines.append(f"| ensemble (majority vote) | | | {e['vote_accuracy']:.4f} |" + (" |" if tta else "") + " |")
    c, best = report["cost"], report["best_member"]
    by_val = next((r for r in report["members"] if r["name"] == best["by_val_accuracy"]), None)
    views = len(report["tta"]["views"])
    lines.append(f"\n{f'with TTA ({views} views): ' if tta else ''}ensemble {e['test_accuracy']:.4f} vs its best "
                 f"member {best['test_accuracy']:.4f} ({best['by_test_accuracy']}, the best on the test set itself): "
                 f"margin {100 * report['margin_over_best_member']:+.2f} points on {report['test_images']} test "
                 "images" +
                 (f"; vs the member with the best validation accuracy ({by_val['name']}, "
                  f"{by_val['test_accuracy']:.4f}): {100 * (e['test_accuracy'] - by_val['test_accuracy']):+.2f}"
                  if by_val else ""))
    if tta:
        plain = report["best_member_without_tta"]
        lines.append(f"without TTA: ensemble {e['test_accuracy_without_tta']:.4f} vs its best member "
                     f"{plain['test_accuracy']:.4f} ({plain['by_test_accuracy']}): margin "
                     f"{100 * report['margin_over_best_member_without_tta']:+.2f} points; TTA itself: "
                     f"{100 * (e['test_accuracy'] - e['test_accuracy_without_tta']):+.2f} points for the ensemble")
    lines.append(f"calibration of the ensemble: {report['calibration']}")
    lines.append(f"cost: {c['forward_images'] // max(c['forward_images_one_model'], 1)}x the forward passes of one "
                 f"model ({c['predict_seconds']:.1f} s for all members and views); the members' training: "
                 f"{c['train_seconds']:.0f} s, {c['train_images']} images (search trials included, checkpoints of "
                 "an earlier run not counted)")
    return "\n".join(lines)


def run_ensemble(config: Config | None, run_dir, *, seeds: int = 0, from_search=None, top: int = 0, from_run=None,
                 last: int = 0, snapshots: int = 0, cycle_epochs: int = 2, tta: bool = False, tta_views_=None,
                 tta_padding: int | None = None, backend: str = "local", ray_options=None, log=print) -> dict:
    """Gather (and train) the members, then ``evaluate`` them (see the module docstring)."""
    for name, value in (("--members", seeds), ("--top", top), ("--last", last), ("--snapshots", snapshots)):
        if value < 0:
            raise EnsembleError(f"{name} must be >= 0, got {value}")
    if cycle_epochs < 1:
        raise EnsembleError(f"--cycle-epochs must be >= 1, got {cycle_epochs}")
    if top and from_search is None:
        raise EnsembleError("--top needs --from-search DIR")
    if last and from_run is None:
        raise EnsembleError("--last needs --from-run DIR")
    run_dir = Path(run_dir).resolve()
    check_writable(run_dir)
    members = []
    if from_search is not None:
        members += search_members(from_search, top or 3)
    if from_run is not None:
        members += run_members(from_run, last or 3)
    if seeds or snapshots:
        if config is None:
            raise EnsembleError("--members/--snapshots need a config to train")
        for member in members:  # before training for minutes
            _check_same_test_set(trials.load_predictor(member.checkpoint, member.name).config, member.checkpoint,
                                 config, "the members to train here")
        try:
            trained = train_members(config, seeds, snapshots, cycle_epochs, run_dir, backend, ray_options, log)
            members = trained + members
        except ConfigError as exc:
            raise EnsembleError(str(exc)) from None
    views = None
    if tta and members:
        views = default_views(members, tta_views_, tta_padding, log)
    return evaluate(members, run_dir, views, log)


def default_views(members: list, names=None, padding: int | None = None, log=print) -> list | None:
    """The TTA views: NAMES when given (said when the members never saw them), else only those
    every member trained with (crops with --crop-padding, mirror images with --flip);
    None when there is none."""
    configs = [trials.load_predictor(m.checkpoint, m.name).config for m in members]
    cropped, flipped = all(c.crop_padding for c in configs), all(c.flip for c in configs)
    known = (["crop"] if cropped else []) + (["flip"] if flipped else [])
    if names:
        new = [n for n in names if n not in known]
        if new:
            log(f"note: --tta-views {','.join(new)}: the members did not train with these views (--crop-padding, "
                "--flip), so test-time augmentation may cost accuracy; the scores with and without it are below")
    else:
        names = known
        if not names:
            log("note: --tta: the members trained without crops or flips, so there is no view they know; scoring "
                "without test-time augmentation (--tta-views crop,flip tries views anyway)")
            return None
    least = min(c.crop_padding for c in configs)
    return tta_views(names, padding if padding is not None else max(1, least // 2))
