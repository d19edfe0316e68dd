"""The pycnn command.

    pycnn train [--config FILE.toml] [--KEY VALUE ...] [--run-dir DIR] [--resume | --overwrite] [--checks on|off]
        train a CNN (default: the embedded handwritten digits, offline) and write a run
        directory with config, history, checkpoints and figures; validation accuracy per
        epoch, the test accuracy once at the end; Ctrl-C saves and stops (--resume continues).
        Each run gets a new folder runs/YYYYMMDD-HHMMSS (runs/latest: the newest); a --run-dir
        that holds a run is refused unless --resume or --overwrite
    pycnn check [--config FILE.toml] [--KEY VALUE ...]
        the sanity checks of a config before training: initial loss against ln(C), the
        regularisation term, overfitting a tiny subset, a gradient check of the whole model
    pycnn evaluate RUN_DIR|CHECKPOINT [--split test|val|train] [--dataset NAME]
        score a run's best checkpoint (or a checkpoint) on the data and pre-processing recorded
        in it: images, accuracy per class, the confusion matrix (and its figure)
    pycnn finetune CHECKPOINT --preset NAME [--classes 5,6,7,8,9] [--layer K] [--probe softmax|svm] ...
        transfer a trained network to new data with one of the four strategies of the tips
        (small/large data x similar/different task)
    pycnn bench [--quick] [--ops relu,conv3x3] [--json PATH] [--no-torch]
        check, then time the C++ kernels against PyTorch CPU and the machine's limits
        (2 threads each) and print one table
    pycnn search | ensemble | imbalance ...
        random search coarse to fine, ensembles with test-time augmentation, class-imbalance
        remedies (pycnn search --help)

Bad input or an unusable environment (a device, a run directory) ends with one line naming
the argument and exit status 2; Ctrl-C with 130.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import pycnn
from pycnn import _startup
from pycnn.bench import harness as benchmarks
from pycnn.training import checks, evaluation, figures, finetune, pipeline, rundir, runs
from pycnn.training.arguments import (
    EXIT_INTERRUPTED,
    Parser,
    add_config_flags,
    fail,
    parse_int,
    parse_int_list,
    parse_number,
    parse_size,
)
from pycnn.training.checkpoints import CheckpointError
from pycnn.training.config import Config, ConfigError, check_device
from pycnn.training.tools import cli as tools


def _config(args, command: str):
    """The Config of the flags (over --config, or over a resumed run's config.json)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
    saved = Path(args.run_dir) / "config.json" if getattr(args, "run_dir", None) else None
    if getattr(args, "config", None):
        try:
            return Config.from_toml(args.config, **overrides)
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {args.config} ({exc.strerror or exc})") from None
    if getattr(args, "resume", False) and saved is not None and saved.is_file():
        try:  # a resumed run keeps its settings unless a flag changes one
            values = json.loads(saved.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume: {saved} is unreadable ({exc})") from None
        return Config.from_dict(values, **overrides)
    return Config(**overrides)


# ---------------------------------------------------------------------------- commands

def _train(args) -> int:
    latest = None
    if args.run_dir is None:  # a new folder per run, runs/latest the newest; --resume continues runs/latest
        default = rundir.RUNS_ROOT / "latest"
        if args.resume:
            args.run_dir = os.path.relpath(default.resolve()) if default.is_symlink() else str(default)
        else:
            args.run_dir, latest = str(rundir.new_run_dir()), default
    try:
        config = _config(args, "train")
        check_device(config.device)
    except ConfigError as exc:
        return fail("train", exc)
    try:
        with pycnn.profile() if args.profile else contextlib.nullcontext() as timings:
            options = dict(resume=args.resume, checks=args.checks == "on", overwrite=args.overwrite, latest=latest)
            if config.folds:
                summary = runs.run_folds(config, args.run_dir, **options)
            else:
                history = runs.run(config, args.run_dir, **options)
    except (ConfigError, rundir.RunDirError, CheckpointError, FileNotFoundError) as exc:
        return fail("train", exc)
    except RuntimeError as exc:
        return fail("train", exc)
    except ValueError as exc:  # a value the checks above let through, rejected deeper down
        return fail("train", f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        if not runs.latest_checkpoint(args.run_dir):
            return fail("train", f"interrupted before the first checkpoint: stopped at once; {args.run_dir} holds no "
                                  "checkpoint to resume from", EXIT_INTERRUPTED)
        return fail("train", f"interrupted outside a training batch (or a second Ctrl-C): stopped at once; the "
                              f"checkpoints in {args.run_dir} are intact (--resume continues from the newest)",
                     EXIT_INTERRUPTED)
    except OSError as exc:
        return fail("train", f"cannot write the run ({exc})", 1)
    if timings is not None and not (summary if config.folds else history).get("nothing_to_do"):
        print(f"time spent in ops (training and validation):\n{timings.table()}")
    if config.folds:
        return _report_folds(summary, args.run_dir)
    return _report_run(history, args.run_dir)


def _ended_early(result: dict, run_dir, saved: str) -> int | None:
    """The exit status of a run (or a cross-validation) that was interrupted or stopped early
    (saying so), else None; a resumed run with nothing to do is said too."""
    if result.get("nothing_to_do"):
        print(f"nothing to do: {result['nothing_to_do']}")
    if result["interrupted"]:
        return fail("train", f"interrupted: saved {result['interrupted']}{saved}; continue with: "
                             f"pycnn train --run-dir {run_dir} --resume", EXIT_INTERRUPTED)
    if result["stopped"]:
        print(f"stopped early: {result['stopped']}")
        return 1
    return None


def _report_run(history: dict, run_dir) -> int:
    status = _ended_early(history, run_dir, ", the history and the figures")
    if status is not None:
        return status
    seconds = sum(history["epoch_seconds"])
    images = sum(s * r for s, r in zip(history["epoch_seconds"], history["images_per_second"]))
    best, test = history["best_epoch"], history["test"]
    if history["val_accuracy"]:
        print(f"best validation accuracy {history['val_accuracy'][best - 1]:.4f} at epoch {best} of "
              f"{len(history['train_loss'])}" + (f" ({history['early_stopped']})" if history["early_stopped"] else ""))
    if test is not None:
        print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) on {test['images']} test images, "
              f"measured once with the weights of epoch {test['epoch']} ({test['chosen_by']})")
    print(f"{len(history['train_loss'])} epochs, {seconds:.1f} s training, {images / max(seconds, 1e-9):.0f} "
          f"images/s; run directory {run_dir}")
    return 0


def _report_folds(summary: dict, run_dir) -> int:
    status = _ended_early(summary, run_dir, "")
    if status is not None:
        return status
    scores = ", ".join(f"{s:.4f}" for s in summary["val_accuracy"])
    print(f"{summary['folds']}-fold cross-validation: best validation accuracy per fold {scores}; mean "
          f"{summary['mean']:.4f} +- {summary['std']:.4f} (the test set was not used: choose settings by this, then "
          f"train once with a validation split for the test accuracy); run directory {run_dir}")
    return 0


def _check(args) -> int:
    try:
        config = _config(args, "check")
        if config.device != "cpu":
            raise ConfigError(f"device: pycnn check runs its checks on the CPU; leave out --device {config.device}")
        report = checks.run_checks(config, pipeline.split_data(config), overfit_images=args.images, steps=args.steps)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        return fail("check", exc)
    except ValueError as exc:
        return fail("check", f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return fail("check", "interrupted", EXIT_INTERRUPTED)
    print(report.block())
    return 0 if report.passed else 1


def _evaluate(args) -> int:
    try:
        result = evaluation.evaluate(args.checkpoint, args.dataset, args.split)
    except CheckpointError as exc:
        return fail("evaluate", f"CHECKPOINT: {exc}")
    except (ConfigError, FileNotFoundError) as exc:
        return fail("evaluate", f"--{exc}" if str(exc).startswith(("dataset", "split")) else exc)
    except KeyboardInterrupt:
        return fail("evaluate", "interrupted", EXIT_INTERRUPTED)
    print(result.summary())
    target = evaluation.figure_path(result)
    try:
        figures.plot_confusion(result.matrix, result.names, target,
                               f"{result.checkpoint.name}: {result.dataset} {result.split}, {result.images} images, "
                               f"accuracy {result.accuracy:.4f}")
    except OSError as exc:
        print(f"pycnn evaluate: the confusion matrix figure was not written: {target} ({exc.strerror or exc})",
              file=sys.stderr)
    else:
        print(f"figure: {target}")
    return 0


def _finetune(args) -> int:
    try:
        result = finetune.run_preset(args.checkpoint, args.preset, run_dir=args.run_dir, dataset=args.dataset,
                                     classes=args.classes, limit=args.limit, layer=args.layer, probe=args.probe,
                                     epochs=args.epochs, lr=args.lr, val_size=args.val_size, seed=args.seed,
                                     overwrite=args.overwrite)
    except CheckpointError as exc:
        return fail("finetune", f"CHECKPOINT: {exc}")
    except (ConfigError, rundir.RunDirError, FileNotFoundError) as exc:
        return fail("finetune", exc)
    except finetune.FinetuneStopped as exc:  # as pycnn train says it
        print(f"stopped early: {exc}")
        return 1
    except KeyboardInterrupt:
        return fail("finetune", "interrupted", EXIT_INTERRUPTED)
    print(result.summary())
    return 0


def _bench(args) -> int:
    ops = None
    if args.ops is not None:
        ops = [name.strip() for name in args.ops.split(",") if name.strip()]
        if not ops:
            print("pycnn bench: --ops must name at least one op, e.g. relu,conv3x3 (leave it out for all)",
                  file=sys.stderr)
            return 2
    if args.json:  # before minutes of measuring: the file must be writable
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK) \
                or (target.exists() and not os.access(target, os.W_OK)):
            print(f"pycnn bench: --json cannot write {args.json}: expected a file path in a writable directory",
                  file=sys.stderr)
            return 2
    log = (lambda message: print(f"  {message}", file=sys.stderr, flush=True)) if args.verbose else None
    try:
        rows, facts = benchmarks.run(quick=args.quick, ops=ops, use_torch=not args.no_torch, log=log)
    except (ValueError, RuntimeError) as exc:
        print(f"pycnn bench: {exc}", file=sys.stderr)
        return 2
    except AttributeError as exc:  # a built pycnn._C older than the sources
        return fail("bench", f"the C++ extension does not match the sources ({exc}): rebuild it with "
                              "pip install --no-build-isolation -e .")
    except AssertionError as exc:  # a case did not match the reference: nothing is timed after it
        detail = " ".join(str(exc).split())[:300]
        return fail("bench", f"a correctness check failed, so the timings were not printed: {detail}", 1)
    print(benchmarks.table(rows, facts))
    if args.json:
        Path(args.json).write_text(json.dumps([row.as_json() for row in rows], indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


TRAIN_DESCRIPTION = """Train a CNN and write a run directory (config, history, checkpoints, figures, report).

Runs are never replaced without being asked:
  without --run-dir, every run gets a new folder runs/YYYYMMDD-HHMMSS and runs/latest
    (a symbolic link) points at the newest; --resume alone continues runs/latest
  --run-dir DIR that already holds a run is refused (exit 2, nothing changed) unless
    --resume (continue it) or --overwrite (delete its checkpoints and train anew)
  --resume keeps the run's settings: a flag that changes one is refused, except --epochs
    (more epochs, where the schedule allows: not cosine, whose rate reaches 0 at the
    planned last epoch), --device, --prefetch, --diagnostics-every and --cuda-graph, each
    said when it changes; resuming a finished run says there is nothing to do (exit 0)
Ctrl-C finishes the batch, saves a checkpoint and exits with 130 (--resume continues)."""


def build_parser() -> Parser:
    """The parser of every command (pycnn --help)."""
    parser = Parser(prog="pycnn", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pycnn {pycnn.__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    train = commands.add_parser("train", help="train a CNN and write a run directory", description=TRAIN_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="a TOML file whose keys are the flags below (flags override it)")
    train.add_argument("--run-dir", default=None,
                       help="where to write the run (default: a new folder runs/YYYYMMDD-HHMMSS, runs/latest pointing "
                            "at it; with --resume: runs/latest)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its newest checkpoint, with its settings")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run that --run-dir holds (its checkpoints are deleted)")
    train.add_argument("--profile", action="store_true", help="print the time spent in each op at the end")
    train.add_argument("--checks", choices=("on", "off"), default="on",
                       help="run the sanity checks of 'pycnn check' first (default: on)")
    add_config_flags(train)

    check = commands.add_parser("check", help="sanity checks of a config before training (exit 1 when one fails)")
    check.add_argument("--config", help="a TOML file whose keys are the flags of pycnn train")
    check.add_argument("--images", type=parse_int, default=50, help="images of the overfitting check (default: 50)")
    check.add_argument("--steps", type=parse_int, default=200,
                       help="step budget of the overfitting check (default: 200)")
    add_config_flags(check)

    evaluate = commands.add_parser(
        "evaluate", help="score a run's best checkpoint (or a checkpoint) on a split of its data",
        description="Score a checkpoint on the data and pre-processing recorded in it: the image count, loss, "
                    "accuracy, per-class accuracy and the confusion matrix (also drawn as "
                    "RUN_DIR/confusion_SPLIT_CHECKPOINT.png).")
    evaluate.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                          help="a run directory (its best epoch by validation accuracy) or a checkpoint file "
                               "(RUN_DIR/checkpoints/epoch_NNN.npz)")
    evaluate.add_argument("--dataset", choices=("digits", "cifar10"), default=None,
                          help="another dataset than the checkpoint's (default: the checkpoint's)")
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test",
                          help="which images: test, val (the run's validation images) or train (default: test)")

    tune = commands.add_parser("finetune", help="transfer a trained network to new data",
                               formatter_class=argparse.RawTextHelpFormatter,
                               description="presets (the tips' table):\n" + "\n".join(
                                   f"  {name}: {preset.description}" for name, preset in finetune.PRESETS.items()))
    tune.add_argument("checkpoint", metavar="CHECKPOINT",
                      help="the checkpoint of the trained network (RUN_DIR/checkpoints/epoch_NNN.npz)")
    tune.add_argument("--preset", choices=tuple(finetune.PRESETS), required=True,
                      help="the strategy: similar or different task, small or large data (see above)")
    tune.add_argument("--dataset", choices=("digits", "cifar10"), default=None,
                      help="the new task's dataset (default: the checkpoint's)")
    tune.add_argument("--classes", type=parse_int_list, default=None,
                      help="labels of the new task, e.g. 5,6,7,8,9 (default: the checkpoint's)")
    tune.add_argument("--limit", type=parse_int, default=None, help="use N training images (default: all)")
    tune.add_argument("--layer", type=parse_int, default=None,
                      help="the layer whose output the probe reads, or the first layer a fine-tune trains "
                           "(default: the preset's)")
    tune.add_argument("--probe", choices=("softmax", "svm"), default=None,
                      help="linear probe loss of the probe presets (default: the preset's)")
    tune.add_argument("--epochs", type=parse_int, default=None, help="epochs of training (default: the preset's)")
    tune.add_argument("--lr", type=parse_number, default=None,
                      help="learning rate of the new head (default: 0.1 for a probe, else the checkpoint's)")
    tune.add_argument("--val-size", type=parse_size, default="auto",
                      help="validation images held out of the new training set: auto, N or 0 (default: auto)")
    tune.add_argument("--seed", type=parse_int, default=0, help="seed of the new head and the batches (default: 0)")
    tune.add_argument("--run-dir", default="runs/finetune",
                      help="where to write the fine-tuned run (default: runs/finetune; refused when it holds a run)")
    tune.add_argument("--overwrite", action="store_true",
                      help="replace the run that --run-dir holds (its checkpoints are deleted)")

    bench = commands.add_parser("bench", help="time the C++ kernels against PyTorch CPU and the machine's limits")
    bench.add_argument("--quick", action="store_true", help="one shape per op and few repeats (a smoke test)")
    bench.add_argument("--ops", help="comma-separated ops to run, e.g. relu,conv3x3 (default: all)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list of objects")
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out (its columns stay empty)")
    bench.add_argument("--verbose", action="store_true", help="name each case on stderr as it runs")

    tools.add_parsers(commands)
    return parser


def main(argv=None) -> int:
    try:
        _startup.quiet_startup_interrupt(False)  # from here on, KeyboardInterrupt as usual (caught below)
        args = build_parser().parse_args(argv)
        if args.command in tools.COMMANDS:
            return tools.run(args)
        return {"train": _train, "check": _check, "evaluate": _evaluate, "finetune": _finetune,
                "bench": _bench}[args.command](args)
    except KeyboardInterrupt:  # while starting, or a second Ctrl-C
        return fail(getattr(locals().get("args"), "command", "") or "", "interrupted", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
