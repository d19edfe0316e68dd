"""The ``pycnn`` command.

    pycnn train [--config FILE.toml] [--KEY VALUE ...] [--run-dir DIR] [--resume] [--profile]
        train a CNN (default: the embedded handwritten digits, offline) and write a run
        directory with config, history, checkpoints and figures
    pycnn evaluate CHECKPOINT [--dataset NAME] [--split test|train]
        score a checkpoint
    pycnn bench [--quick] [--ops relu,conv3x3] [--json PATH] [--no-torch]
        check, then time the C++ kernels against PyTorch CPU and the machine's limits
        (2 threads each) and print one table
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _widths(text: str) -> tuple:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,128, got {text!r}") from None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from pycnn.train import Config

    for field in dataclasses.fields(Config):
        kind = {bool: _bool, tuple: _widths}.get(type(field.default), type(field.default))
        choices = Config.CHOICES.get(field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind, default=None,
                            choices=choices, metavar=None if choices else field.name.upper(),
                            help=f"(default: {field.default})")


def _train(args) -> int:
    from pycnn.train import Config, run

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    saved = Path(args.run_dir) / "config.json"
    try:
        if args.config:
            config = Config.from_toml(args.config, **overrides)
        elif args.resume and saved.is_file():  # a resumed run keeps its settings unless a flag changes one
            config = Config(**{**json.loads(saved.read_text()), **overrides})
        else:
            config = Config(**overrides)
    except (ValueError, TypeError) as exc:
        print(f"pycnn train: {exc}", file=sys.stderr)
        return 2
    import pycnn

    try:
        with pycnn.profile() if args.profile else contextlib.nullcontext() as timings:
            history = run(config, args.run_dir, resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pycnn train: {exc}", file=sys.stderr)
        return 2
    if timings is not None:
        print(f"time spent in ops (training and validation):\n{timings.table()}")
    if history["stopped"]:
        print(f"stopped early: {history['stopped']}")
        return 1
    seconds = sum(history["epoch_seconds"])
    images = sum(s * r for s, r in zip(history["epoch_seconds"], history["images_per_second"]))
    print(f"final test accuracy {history['val_accuracy'][-1]:.4f} after {len(history['train_loss'])} epochs "
          f"({seconds:.1f} s training, {images / max(seconds, 1e-9):.0f} images/s); run directory {args.run_dir}")
    return 0


def _evaluate(args) -> int:
    from pycnn.train import evaluate_checkpoint

    loss, accuracy = evaluate_checkpoint(args.checkpoint, args.dataset, args.split)
    print(f"{args.checkpoint}: {args.dataset} {args.split} loss {loss:.4f}, accuracy {accuracy:.4f}")
    return 0


def _bench(args) -> int:
    from pycnn import benchmarks

    ops = [name.strip() for name in args.ops.split(",") if name.strip()] if args.ops else None
    log = (lambda message: print(f"  {message}", file=sys.stderr, flush=True)) if args.verbose else None
    try:
        rows, facts = benchmarks.run(quick=args.quick, ops=ops, use_torch=not args.no_torch, log=log)
    except (ValueError, RuntimeError) as exc:
        print(f"pycnn bench: {exc}", file=sys.stderr)
        return 2
    print(benchmarks.table(rows, facts))
    if args.json:
        Path(args.json).write_text(json.dumps([row.as_json() for row in rows], indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pycnn", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a CNN and write a run directory")
    train.add_argument("--config", help="a TOML file whose keys are the flags below (flags override it)")
    train.add_argument("--run-dir", default="runs/latest", help="where to write the run (default: runs/latest)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --run-dir")
    train.add_argument("--profile", action="store_true", help="print the time spent in each op at the end")
    _add_config_flags(train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a dataset split")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")

    bench = commands.add_parser("bench", help="time the C++ kernels against PyTorch CPU and the machine's limits")
    bench.add_argument("--quick", action="store_true", help="one shape per op and few repeats (a smoke test)")
    bench.add_argument("--ops", help="comma-separated ops to run, e.g. relu,conv3x3 (default: all)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list of objects")
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out (its columns stay empty)")
    bench.add_argument("--verbose", action="store_true", help="name each case on stderr as it runs")

    args = parser.parse_args(argv)
    return {"train": _train, "evaluate": _evaluate, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
