"""The commands ``pycnn search``, ``pycnn ensemble`` and ``pycnn imbalance`` (wired into
``pycnn.training.cli`` by ``add_parsers`` and ``run``).  Every setting of ``pycnn train`` is a flag of
each (the fixed settings; a search draws the ones of its space), plus their own flags below.
Bad input ends with one line naming the argument and exit status 2; Ctrl-C with 130 and the
command that continues."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pycnn.training import arguments as base
from pycnn.training import rundir
from pycnn.training.checkpoints import CheckpointError
from pycnn.training.config import Config, ConfigError, check_device
from pycnn.training.tools import ensemble, imbalance, raytune, search

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMANDS = ("search", "ensemble", "imbalance")


def _positive(text: str) -> int:
    value = base.parse_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _names(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_ray_flags(parser, default_dir: str) -> None:
    parser.add_argument("--config", help="a TOML file whose keys are the flags of pycnn train (flags override it)")
    parser.add_argument("--run-dir", default=default_dir, help=f"where to write (default: {default_dir})")
    parser.add_argument("--backend", choices=("ray", "local"), default="ray",
                        help="ray: parallel on Ray (a local instance, or --address); local: one after another in "
                             "this process (default: ray)")
    parser.add_argument("--address", default=None,
                        help="join an existing Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of starting a "
                             "local instance; the run directory must be on storage every node sees")
    parser.add_argument("--cpus", type=_positive, default=None,
                        help="CPUs the local Ray instance offers (default: all of this machine's)")
    parser.add_argument("--gpus", type=base.parse_int, default=None, help="GPUs the local Ray instance offers")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="CPU threads per trial / job (OpenMP threads of the C++ kernels; default: 1)")


def add_parsers(commands) -> None:
    search = commands.add_parser(
        "search", help="random search over settings, coarse to fine, with early abort (on Ray)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=(
            "Random search: each trial draws every searched setting (--param, or a [space] table in --config:\n"
            "  lr = {log_uniform = [1e-3, 1.0]}, dropout = {uniform = [0, 0.5]}, batch_size = {choice = [32, 64]}),\n"
            "default lr and weight_decay log-uniform.  Stage 1: --trials short trials of --epochs epochs; each\n"
            "later stage narrows the ranges around the best trials and trains longer.  Trials stop when the\n"
            "loss exceeds 3x its initial value or successive halving cuts them; results.csv, figures, best.toml."))
    search.add_argument("--param", action="append", default=[], metavar="KEY=KIND:VALUES",
                        help="a searched setting: lr=log:1e-4,1e-1  dropout=uniform:0,0.5  batch_size=choice:32,64  "
                             "widths=choice:16/32,32/64 (repeatable; overrides the TOML's [space])")
    search.add_argument("--trials", type=_positive, default=16, help="trials of stage 1 (default: 16)")
    search.add_argument("--stages", type=_positive, default=2, help="coarse-to-fine stages (default: 2)")
    search.add_argument("--fine-trials", type=base.parse_int, default=0,
                        help="trials of each later stage (default: half of --trials, at least 2)")
    search.add_argument("--fine-epochs", type=base.parse_int, default=0,
                        help="epochs of each later stage's trials (default: twice the stage before)")
    search.add_argument("--top", type=base.parse_int, default=0,
                        help="best trials whose values set the next stage's ranges (default: a quarter, >= 3)")
    search.add_argument("--eta", type=base.parse_number, default=3.0,
                        help="successive halving keeps the best 1/eta at each rung (default: 3)")
    search.add_argument("--grace", type=_positive, default=1, help="epochs before the first cut (default: 1)")
    search.add_argument("--search-seed", type=base.parse_int, default=0, help="seed of the sampling (default: 0)")
    search.add_argument("--resume", action="store_true", help="continue the search in --run-dir")
    _add_ray_flags(search, "runs/search")
    base.add_config_flags(search)

    ens = commands.add_parser(
        "ensemble", help="build and score an ensemble (seeds, a search's top trials, a run's checkpoints, "
                         "snapshots) with test-time augmentation",
        description="Members: --members N (the config trained with seeds seed..seed+N-1, in parallel), "
                    "--from-search DIR --top K, --from-run DIR --last K, --snapshots K (one run with a cyclic "
                    "schedule); any mix.  Probabilities are averaged (majority vote reported too).")
    ens.add_argument("--members", type=base.parse_int, default=0, help="members trained with different seeds")
    ens.add_argument("--from-search", default=None, metavar="DIR", help="a pycnn search folder")
    ens.add_argument("--top", type=base.parse_int, default=0, help="the search's best K trials (default: 3)")
    ens.add_argument("--from-run", default=None, metavar="DIR", help="a run folder (pycnn train --run-dir)")
    ens.add_argument("--last", type=base.parse_int, default=0, help="the run's last K epoch checkpoints (default: 3)")
    ens.add_argument("--snapshots", type=base.parse_int, default=0,
                     help="one run of K cycles of a cyclic cosine schedule; its end-of-cycle checkpoints")
    ens.add_argument("--cycle-epochs", type=_positive, default=2, help="epochs per snapshot cycle (default: 2)")
    ens.add_argument("--tta", action="store_true", help="test-time augmentation: average over views of each image")
    ens.add_argument("--tta-views", type=_names, default=None,
                     help="flip,crop (default: crops, plus flips when the members trained with flips)")
    ens.add_argument("--tta-padding", type=base.parse_int, default=None,
                     help="shift of the crop views in pixels (default: the training crops' padding, or 1)")
    _add_ray_flags(ens, "runs/ensemble")
    base.add_config_flags(ens)

    imb = commands.add_parser(
        "imbalance", help="long-tailed data and its remedies (sampling, class weights, two-stage fine-tune), "
                          "per-class accuracy",
        description="Makes the training set long-tailed (class i keeps per_class * ratio^(-i/(C-1)) images), "
                    "trains each remedy on it and reports per-class test accuracy and confusion matrices.  "
                    "--remedies two-stage is the two-stage fine-tune: the classes with many images first, "
                    "then those with few.")
    imb.add_argument("--ratio", type=base.parse_number, default=10.0, help="largest / smallest class (default: 10)")
    imb.add_argument("--profile", choices=("exp", "step"), default="exp", help="exp (long tail) or step")
    imb.add_argument("--per-class", type=base.parse_int, default=0,
                     help="training images of the largest class (default: as many as every class has)")
    imb.add_argument("--remedies", type=_names, default=list(imbalance.DEFAULT_REMEDIES),
                     help=f"some of {','.join(imbalance.REMEDIES)} (default: all: "
                          f"{','.join(imbalance.DEFAULT_REMEDIES)})")
    imb.add_argument("--class-weight", choices=("inverse", "sqrt", "effective"), default="inverse",
                     help="the weights of the 'weights' remedy (default: inverse frequency)")
    imb.add_argument("--head", type=base.parse_int, default=0,
                     help="two-stage: the K largest classes go to stage 1 (default: those above the median)")
    imb.add_argument("--stage2-epochs", type=base.parse_int, default=0,
                     help="two-stage: epochs of stage 2 (default: as many as --epochs)")
    imb.add_argument("--stage2-lr-factor", type=base.parse_number, default=1.0,
                     help="two-stage: stage 2's learning rate as a share of --lr (default: 1; a network pretrained "
                          "elsewhere would take a smaller one, such as 0.1)")
    imb.add_argument("--replay", type=base.parse_int, default=-1,
                     help="two-stage: images of each large class kept in stage 2 (default: the mean tail count; "
                          "0: the small classes alone)")
    imb.add_argument("--imbalance-seed", type=base.parse_int, default=0, help="seed of the long-tailed subset")
    _add_ray_flags(imb, "runs/imbalance")
    base.add_config_flags(imb)


def _config(args, defaults: dict | None = None, space: bool = False):
    """(Config of --config and the flags over ``defaults``, the TOML's [space] table)."""
    values = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {args.config} ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: {args.config} is not valid TOML ({exc})") from None
    table = values.pop("space", {}) if space else {}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config: unknown keys in {args.config}: {unknown} (the keys are the flags of pycnn train"
                          f"{', and a [space] table' if space else ''})")
    overrides = {name: getattr(args, name) for name in known if getattr(args, name, None) is not None}
    return Config(**{**(defaults or {}), **values, **overrides}), table


def _ray_options(args, config) -> dict:
    if args.backend == "local":  # said, rather than ignored
        given = [f"--{name}" for name in ("address", "cpus", "gpus") if getattr(args, name, None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for --backend ray (this run is --backend local)")
    return {"address": args.address, "cpus": args.cpus, "gpus": args.gpus, "threads": args.threads,
            "device": config.device}


def _check_environment(args, config) -> None:
    """The device and the run directory, before anything is trained or written: ConfigError
    or RunDirError (exit 2) naming what is missing."""
    check_device(config.device)
    rundir.check_writable(args.run_dir)


def _need_ray(args) -> None:
    if args.backend == "ray":
        raytune.require()


def _search(args) -> int:
    config, table = _config(args, {"epochs": 3}, space=True)
    _check_environment(args, config)
    space = search.parse_space(table, f"--config {args.config} [space]") if table else {}
    for text in args.param:
        dist = search.parse_param(text)
        space[dist.key] = dist
    space = space or dict(search.DEFAULT_SPACE)
    spec = search.SearchSpec(base=config.to_dict(), space={k: d.to_dict() for k, d in space.items()},
                             trials=args.trials, epochs=config.epochs, stages=args.stages, fine_trials=args.fine_trials,
                             fine_epochs=args.fine_epochs, top=args.top, eta=args.eta, grace=args.grace,
                             seed=args.search_seed)
    if args.resume:
        _refuse_changes_on_resume(args, spec)
    _need_ray(args)
    search.run_search(spec, args.run_dir, resume=args.resume, backend=args.backend,
                      ray_options=_ray_options(args, config))
    return 0


SEARCH_FLAGS = {"trials": "trials", "stages": "stages", "fine_trials": "fine_trials", "fine_epochs": "fine_epochs",
                "top": "top", "eta": "eta", "grace": "grace", "search_seed": "seed"}


def _refuse_changes_on_resume(args, spec) -> None:
    """--resume continues the saved search as it was: a flag given now that would change it is
    refused in one line (it was silently ignored)."""
    state = Path(args.run_dir) / "search.json"
    if not state.is_file():
        return  # run_search says there is nothing to resume
    try:
        saved = search.SearchSpec(**json.loads(state.read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(search.SearchSpec)}
    changed = []
    for flag, field in SEARCH_FLAGS.items():
        value = getattr(args, flag)
        if value != defaults[field] and value != getattr(saved, field):
            changed.append(f"--{flag.replace('_', '-')} {value} (the search's: {getattr(saved, field)})")
    given = {f.name for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    for name in sorted(given | (set(spec.base) if args.config else set())):
        if name in spec.base and spec.base[name] != saved.base.get(name):
            changed.append(f"--{name.replace('_', '-')} {spec.base[name]} (the search's: {saved.base.get(name)})")
    if args.param and any(spec.space.get(k) != saved.space.get(k) for k in spec.space):
        changed.append("--param (the search's space: " + ", ".join(sorted(saved.space)) + ")")
    if changed:
        raise search.SearchError(f"--resume: {', '.join(changed)} would change the search in {args.run_dir}, which "
                                 "continues with its own settings: leave them out, or start a new search in another "
                                 "--run-dir")


def _ensemble(args) -> int:
    if not (args.members or args.from_search or args.from_run or args.snapshots):
        raise ensemble.EnsembleError("no members: give --members N, --from-search DIR, --from-run DIR or "
                                     "--snapshots K")
    config, _ = _config(args)
    _check_environment(args, config)
    if not (args.members or args.snapshots):
        set_here = sorted(name for name in vars(args) if name in {f.name for f in dataclasses.fields(Config)}
                          and getattr(args, name) is not None)
        if set_here or args.config:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in set_here) or "--config"
            raise ensemble.EnsembleError(f"{flags}: settings for members trained here (--members, --snapshots); the "
                                         "members of --from-run / --from-search keep their own")
    if args.members or args.snapshots:
        _need_ray(args)
    ensemble.run_ensemble(config, args.run_dir, seeds=args.members, from_search=args.from_search, top=args.top,
                          from_run=args.from_run, last=args.last, snapshots=args.snapshots,
                          cycle_epochs=args.cycle_epochs, tta=args.tta, tta_views_=args.tta_views,
                          tta_padding=args.tta_padding, backend=args.backend, ray_options=_ray_options(args, config))
    return 0


def _imbalance(args) -> int:
    config, _ = _config(args)
    _check_environment(args, config)
    options = imbalance.Options(ratio=args.ratio, profile=args.profile, per_class=args.per_class,
                                class_weight=args.class_weight, head=args.head, stage2_epochs=args.stage2_epochs,
                                stage2_lr_factor=args.stage2_lr_factor, replay=args.replay, seed=args.imbalance_seed)
    options.check()
    _need_ray(args)
    imbalance.run_imbalance(config, options, args.remedies, args.run_dir, backend=args.backend,
                            ray_options=_ray_options(args, config))
    return 0


def run(args) -> int:
    """Run one of COMMANDS; the exit status."""
    command = args.command
    again = {"search": f"pycnn search --run-dir {args.run_dir} --resume",
             "ensemble": "the same command (finished members are kept, the others resume)",
             "imbalance": "the same command (finished remedies are kept, the others resume)"}[command]
    try:
        return {"search": _search, "ensemble": _ensemble, "imbalance": _imbalance}[command](args)
    except (search.SearchInterrupted, ensemble.EnsembleInterrupted, KeyboardInterrupt) as exc:
        detail = f" ({exc})" if str(exc) else ""
        return base.fail(command, f"interrupted{detail}; the finished trials and the checkpoints are kept in "
                                   f"{args.run_dir}: continue with {again}", base.EXIT_INTERRUPTED)
    except CheckpointError as exc:
        return base.fail(command, f"checkpoint: {exc}")
    except (search.SearchError, ensemble.EnsembleError, imbalance.ImbalanceError, ConfigError, rundir.RunDirError,
            raytune.RayUnavailable, FileNotFoundError) as exc:
        return base.fail(command, exc)
    except ValueError as exc:  # a value the checks above let through, rejected deeper down
        return base.fail(command, f"{type(exc).__name__}: {exc}")
    except (RuntimeError, OSError) as exc:
        return base.fail(command, exc, 1)


def main(argv=None) -> int:
    """``python -m pycnn.training.tools.cli search ...``: the three commands on their own (the same as
    ``pycnn search ...`` once pycnn.training.cli has its hook)."""
    parser = base.Parser(prog="pycnn")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=base.Parser)
    add_parsers(commands)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
