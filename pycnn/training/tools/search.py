"""Random search over any ``Config`` setting, coarse to fine (CS231n, hyperparameter
optimisation; Bergstra and Bengio 2012):

* every trial draws each searched setting independently: ``log_uniform`` (a learning rate or a
  regularisation strength: ``reg = 10 ** uniform(-5, 5)``), ``uniform`` or ``choice``; random
  rather than grid search, so each trial tries a new value of every setting;
* stage 1 runs many short trials (a few epochs); each later stage narrows the range around
  the best trials of the stage before and trains longer (``fine_epochs``); when the best value
  lies on the edge of a range the search says so, and the next stage extends the range past
  that edge instead of narrowing into it;
* a trial stops early when its loss becomes NaN or exceeds 3x its initial value (the Trainer's
  rule: ``aborted``, "diverged"), or when successive halving cuts it: after ``grace`` epochs
  (then ``grace * eta``, ``grace * eta^2``, ...) a trial whose validation accuracy is below the
  ``1 - 1/eta`` quantile of the trials that reached that epoch before it stops (the rule of
  ASHA, Li et al. 2018, as Ray Tune's ASHAScheduler applies it);
* trials run on Ray (``raytune.run_trials``: tasks on a local Ray instance, or on a cluster)
  or one after another in this process (``backend="local"``, for small searches); the
  halving rule is ``Halving`` in both, so both cut the same way, and its records are rebuilt
  from the trial folders when a search resumes;
* everything is kept in the search folder and the search resumes after an interruption:

      DIR/search.json          the search (base config, space, stages) and, at the end, its summary
      DIR/stage_K/plan.json    the stage's space and every trial's sampled settings
      DIR/stage_K/trial_NNN/   a trial folder (config, curve, checkpoints, outcome: see trial.py)
      DIR/results.csv, .md     one row per trial: stage, trial, status, validation accuracy, settings
      DIR/best.toml            the best trial's config (pycnn train --config DIR/best.toml)
      DIR/search_scatter.png   validation accuracy against each searched setting (log axes for
                               log-uniform ones; lr against reg coloured by accuracy)
      DIR/search_curves.png    validation accuracy and training loss per epoch of the best trials

Trials are chosen by validation accuracy only; the best trial's best epoch is scored on the
test set once, at the end.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from pycnn.training.config import Config, ConfigError
from pycnn.training.pipeline import split_data
from pycnn.training.rundir import make_writable_dir
from pycnn.training.tools import plots, raytune
from pycnn.training.tools import trial as trials
from pycnn.training.tools.space import (
    DEFAULT_SPACE,
    Dist,
    SearchError,
    _fmt,
    edge_warnings,
    make_dist,
    narrow,
    parse_param,
    parse_space,
)

__all__ = ["DEFAULT_SPACE", "Dist", "Halving", "SearchError", "SearchInterrupted", "SearchSpec", "make_dist",
           "narrow", "parse_param", "parse_space", "run_search"]


class SearchInterrupted(RuntimeError):
    """Ctrl-C: the finished trials are kept and the search resumes from its folder."""

# ---------------------------------------------------------------------------- halving rule

class Halving:
    """Successive halving, asynchronous (ASHA's rule): rungs at ``grace * eta**k`` epochs
    below ``max_epochs``; a trial reaching a rung continues when its validation accuracy is
    at least the ``1 - 1/eta`` quantile of those recorded at that rung before it."""

    def __init__(self, max_epochs: int, grace: int = 1, eta: float = 3):
        if grace < 1 or eta <= 1:
            raise SearchError(f"--grace must be >= 1 and --eta > 1, got {grace} and {eta}")
        self.eta, self.rungs, r = eta, {}, grace
        while r < max_epochs:
            self.rungs[int(r)] = {}
            r = max(r + 1, math.ceil(r * eta))

    def record(self, trial: str, epoch: int, value) -> bool:
        """Record ``trial``'s score at ``epoch``; False: cut it."""
        rung = self.rungs.get(int(epoch))
        if rung is None or value is None or trial in rung:
            return True
        cutoff = float(np.nanpercentile(list(rung.values()), 100 * (1 - 1 / self.eta))) if rung else None
        rung[trial] = float(value)
        return cutoff is None or value >= cutoff

    def replay(self, trial: str, curve: list) -> None:
        for row in curve:
            self.record(trial, row["epoch"], row["val_accuracy"])


# --------------------------------------------------------------------------------- stages

@dataclasses.dataclass
class TrialSpec:
    stage: int
    index: int
    values: dict        # the sampled settings
    config: dict        # the whole Config
    folder: str

    @property
    def id(self) -> str:
        return f"s{self.stage}t{self.index:03d}"


def sample_stage(base: Config, space: dict, n: int, epochs: int, stage: int, seed: int, folder: Path) -> list:
    rng = np.random.default_rng([seed, stage, 0x5EA])
    specs = []
    for i in range(n):
        values = {key: dist.sample(rng) for key, dist in space.items()}
        try:
            config = dataclasses.replace(base, epochs=epochs, **values)
        except ConfigError as exc:
            raise SearchError(f"space: trial {i} drew an invalid combination ({exc})") from None
        specs.append(TrialSpec(stage, i, {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
                               config.to_dict(), str(folder / f"trial_{i:03d}")))
    return specs


# ------------------------------------------------------------------------------- the search

@dataclasses.dataclass
class SearchSpec:
    base: dict                  # the fixed settings (a Config)
    space: dict                 # key -> Dist.to_dict()
    trials: int = 16
    epochs: int = 3
    stages: int = 2
    fine_trials: int = 0        # 0: max(2, trials // 2)
    fine_epochs: int = 0        # 0: 2 x epochs
    top: int = 0                # trials that define the next stage's ranges (0: a quarter, at least 2)
    eta: float = 3.0
    grace: int = 1
    seed: int = 0

    def stage_size(self, stage: int) -> tuple[int, int]:
        """(trials, epochs) of a stage: later stages default to half the trials and twice the epochs."""
        if stage == 1:
            return self.trials, self.epochs
        return self.fine_trials or max(2, self.trials // 2), self.fine_epochs or self.epochs * 2 ** (stage - 1)

    def dists(self) -> dict:
        return {k: make_dist(k, *next(iter(d.items()))) for k, d in self.space.items()}


def check_spec(spec: SearchSpec) -> Config:
    for name, value, low in (("--trials", spec.trials, 1), ("--epochs", spec.epochs, 1), ("--stages", spec.stages, 1),
                             ("--fine-trials", spec.fine_trials, 0), ("--fine-epochs", spec.fine_epochs, 0),
                             ("--top", spec.top, 0), ("--grace", spec.grace, 1)):
        if value < low:
            raise SearchError(f"{name} must be at least {low}, got {value}")
    base = Config.from_dict(spec.base)
    if base.val_size == 0 or base.folds:
        raise SearchError("--val-size: a search chooses by validation accuracy, so it needs a held-out validation "
                          "set (val_size auto or N > 0, no folds)")
    return base


def run_search(spec: SearchSpec, run_dir, *, resume: bool = False, backend: str = "local", ray_options=None,
               log=print) -> dict:
    """Run (or, with ``resume``, continue) a search in ``run_dir``; returns its summary
    (also in DIR/search.json).  SearchInterrupted on Ctrl-C: rerun with resume=True."""
    run_dir = Path(run_dir).resolve()
    state = run_dir / "search.json"
    if resume:
        if not state.is_file():
            raise SearchError(f"--resume: {run_dir} holds no search (no search.json); leave out --resume to start one")
        saved = json.loads(state.read_text())["spec"]
        spec = SearchSpec(**saved)
        log(f"resuming the search in {run_dir}")
    elif state.is_file():
        raise SearchError(f"--run-dir: {run_dir} holds a search already; add --resume to continue it or choose "
                          "another folder")
    base = check_spec(spec)
    make_writable_dir(run_dir)
    if not resume:
        state.write_text(json.dumps({"spec": dataclasses.asdict(spec)}, indent=1))
    session = contextlib.nullcontext()
    if backend == "ray":  # one Ray instance for every stage
        options = ray_options or {}
        session = raytune.session(options.get("address"), options.get("cpus"), options.get("gpus"),
                                  options.get("threads", 1))
    with session:
        all_specs, warnings, spaces = _run_stages(spec, base, run_dir, backend, ray_options, log)
    best_spec = _best(all_specs)[0]
    return finish(spec, all_specs, run_dir, warnings, edge_warnings(spaces[best_spec.stage], best_spec.values), log)


def _run_stages(spec: SearchSpec, base: Config, run_dir: Path, backend: str, ray_options, log):
    """Plan (or read the plan of) each stage and run its unfinished trials."""
    space = spec.dists()
    all_specs, warnings, spaces = [], [], {}
    for stage in range(1, spec.stages + 1):
        folder = run_dir / f"stage_{stage}"
        plan_path = folder / "plan.json"
        n, epochs = spec.stage_size(stage)
        if plan_path.is_file():
            plan = json.loads(plan_path.read_text())
            space = {k: make_dist(k, *next(iter(d.items()))) for k, d in plan["space"].items()}
            stage_specs = [TrialSpec(**t) for t in plan["trials"]]
            warnings += plan.get("warnings", [])
        else:
            stage_warnings = []
            if stage > 1:
                scored = [(s, o.val_accuracy) for s, o in _outcomes(all_specs) if o.val_accuracy is not None
                          and s.stage == stage - 1]
                if not scored:
                    raise SearchError(f"stage {stage - 1}: no trial reached a validation score; widen or lower the "
                                      "ranges (every trial diverged or was cut)")
                space, stage_warnings = narrow(space, scored, spec.top or max(2, math.ceil(spec.trials / 4)))
                for w in stage_warnings:
                    log(f"warning: {w}; stage {stage} extends the range past that edge")
            stage_specs = sample_stage(base, space, n, epochs, stage, spec.seed, folder)
            folder.mkdir(parents=True, exist_ok=True)
            plan_path.write_text(json.dumps({"stage": stage, "epochs": epochs,
                                             "space": {k: d.to_dict() for k, d in space.items()},
                                             "trials": [dataclasses.asdict(s) for s in stage_specs],
                                             "warnings": stage_warnings}, indent=1))
            warnings += stage_warnings
        spaces[stage] = space
        log(f"stage {stage} of {spec.stages}: {n} trials of {epochs} epochs; " +
            "; ".join(d.describe() for d in space.values()))
        halving = Halving(epochs, spec.grace, spec.eta)
        todo = []
        for s in stage_specs:
            halving.replay(s.id, trials.read_curve(s.folder))
            if trials.read_outcome(s.folder) is None:
                todo.append(s)
        if len(todo) < len(stage_specs):
            log(f"  {len(stage_specs) - len(todo)} trials already done")
        all_specs += stage_specs
        try:
            if todo and backend == "ray":
                raytune.run_trials(todo, halving, log=log, **(ray_options or {}))
            elif todo:
                _run_local(todo, halving, log)
        except (SearchInterrupted, KeyboardInterrupt):
            write_results(all_specs, run_dir)  # the table so far: unfinished trials say so
            raise
        missing = [s.id for s in stage_specs if trials.read_outcome(s.folder) is None]
        if missing:
            write_results(all_specs, run_dir)
            raise SearchInterrupted(f"{len(missing)} trials of stage {stage} did not finish")
    return all_specs, warnings, spaces


def _run_local(todo: list, halving: Halving, log) -> None:
    for s in todo:
        config = Config.from_dict(s.config)
        label = ", ".join(f"{k}={_fmt(v)}" for k, v in s.values.items())
        log(f"  trial {s.id} ({label})", flush=True)

        def report(metrics, s=s):
            log(f"    epoch {metrics['epoch']}: validation accuracy {metrics['val_accuracy']:.4f}, "
                f"train loss {metrics['train_loss']:.4f}", flush=True)
            return halving.record(s.id, metrics["epoch"], metrics["val_accuracy"])

        outcome = trials.train_config(config, s.folder, splits=trials.cached_splits(config), report=report, resume=True)
        if outcome.status == trials.INTERRUPTED:
            raise SearchInterrupted(outcome.reason)
        log(f"    {outcome.status}{': ' + outcome.reason if outcome.reason else ''}")


def _outcomes(specs: list):
    for s in specs:
        o = trials.read_outcome(s.folder)
        if o is not None:
            yield s, o


def _best(specs: list):
    scored = [(s, o) for s, o in _outcomes(specs) if o.val_accuracy is not None]
    if not scored:
        raise SearchError("no trial reached a validation score; widen or lower the ranges")
    return max(scored, key=lambda so: (so[1].val_accuracy, -(so[1].val_loss or 0.0), so[0].stage))


def results_rows(specs: list) -> list:
    keys = list(dict.fromkeys(k for s in specs for k in s.values))
    rows = []
    for s in specs:
        o = trials.read_outcome(s.folder)
        row = {"stage": s.stage, "trial": s.index, "status": o.status if o else "unfinished",
               "val_accuracy": o.val_accuracy if o else None, "val_loss": o.val_loss if o else None,
               "best_epoch": o.best_epoch if o else None, "epochs": o.epochs if o else len(trials.read_curve(s.folder)),
               "seconds": round(o.seconds, 2) if o else None, "reason": o.reason if o else ""}
        row.update({k: s.values.get(k) for k in keys})
        row["folder"] = s.folder
        rows.append(row)
    return rows


def write_results(specs: list, run_dir: Path) -> list:
    rows = results_rows(specs)
    if not rows:
        return rows
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "results.md").write_text(markdown_table(rows))
    return rows


def markdown_table(rows: list, limit: int | None = None) -> str:
    ranked = sorted(rows, key=lambda r: -(r["val_accuracy"] if r["val_accuracy"] is not None else -1))[:limit]
    keys = [k for k in rows[0] if k not in ("folder", "reason", "val_loss", "seconds")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in ranked:
        lines.append("| " + " | ".join("" if r[k] is None else (f"{r[k]:.4g}" if isinstance(r[k], float) else
                                                                 str(r[k])) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def finish(spec: SearchSpec, specs: list, run_dir: Path, warnings: list, final_warnings: list, log) -> dict:
    """Results table, figures, the best config, and the best trial's test accuracy (once)."""
    rows = write_results(specs, run_dir)
    best_spec, best = _best(specs)
    config = Config.from_dict(best_spec.config)
    _write_toml(config, run_dir / "best.toml")
    figures = plots.search_figures(rows, [(s, trials.read_curve(s.folder)) for s in specs], spec.dists(), run_dir)
    test = score_test(Path(best_spec.folder) / best.best_checkpoint)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("finished", "aborted")}
    summary = {"spec": dataclasses.asdict(spec), "trials": len(rows), **counts,
               "cut": sum("successive halving" in r["reason"] for r in rows),
               "diverged": sum(r["reason"].startswith("diverged") for r in rows),
               "best": {"stage": best_spec.stage, "trial": best_spec.index, "values": best_spec.values,
                        "val_accuracy": best.val_accuracy, "best_epoch": best.best_epoch, "epochs": best.epochs,
                        "checkpoint": str(Path(best_spec.folder) / best.best_checkpoint)},
               "test": test, "stage_warnings": warnings, "warnings": final_warnings,
               "figures": [str(p) for p in figures],
               "seconds": round(sum(r["seconds"] or 0 for r in rows), 1)}
    (run_dir / "search.json").write_text(json.dumps(summary, indent=1))
    log(markdown_table(rows, limit=10), end="")
    for w in final_warnings:
        log(f"warning: {w}: widen that range and search again")
    log(f"best: stage {best_spec.stage} trial {best_spec.index} (" +
        ", ".join(f"{k}={_fmt(v)}" for k, v in best_spec.values.items()) +
        f"): validation accuracy {best.val_accuracy:.4f} at epoch {best.best_epoch}; test accuracy "
        f"{test['accuracy']:.4f} on {test['images']} images, measured once; {len(rows)} trials "
        f"({counts['finished']} finished, {counts['aborted']} aborted: {summary['diverged']} diverged, "
        f"{summary['cut']} cut); train it: pycnn train --config {run_dir / 'best.toml'}")
    return summary


def score_test(checkpoint) -> dict:
    predictor = trials.load_predictor(checkpoint)
    splits = split_data(predictor.config)
    probs = predictor.probabilities(splits.test_x)
    return {"accuracy": float((probs.argmax(axis=1) == splits.test_y).mean()), "images": int(len(splits.test_y)),
            "checkpoint": str(checkpoint)}


def _write_toml(config: Config, path: Path) -> None:
    lines = ["# the best trial of a pycnn search: pycnn train --config THIS_FILE"]
    for key, value in config.to_dict().items():
        if key == "fold":
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = "[" + ", ".join(str(v) for v in value) + "]"
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
