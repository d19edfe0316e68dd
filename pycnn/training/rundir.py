"""Run directories: a new run never replaces another's files (``check_run_dir``), each run
without ``--run-dir`` gets its own folder with ``runs/latest`` pointing at the newest, and
``--resume`` continues a run with the settings it was started with (``resume_plan``)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pycnn.training.checkpoints import CheckpointError, list_checkpoints, read_checkpoint
from pycnn.training.config import Config, ConfigError
from pycnn.training.trainer import Trainer


class RunDirError(ValueError):
    """The run directory cannot be used (not writable, missing for --resume, no readable checkpoint)."""




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


def newest_meta(run_dir: Path) -> dict | None:
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
    meta = newest_meta(run_dir)
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
