"""Checkpoint files: ``RUN_DIR/checkpoints/epoch_NNN.npz`` (the end of epoch NNN) and
``epoch_NNN_part_BBBBB.npz`` (epoch NNN interrupted after BBBBB batches), each an .npz of the
model's and the optimizer's arrays plus one JSON ``meta`` entry (``Trainer.state``)."""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a pycnn checkpoint."""


_CHECKPOINT_NAME = re.compile(r"epoch_(\d+)(?:_part_(\d+))?\.npz$")


def checkpoint_order(path) -> tuple:
    """Sort key of a checkpoint file name: epoch_NNN.npz (end of epoch NNN) comes after
    epoch_NNN_part_BBBBB.npz (epoch NNN interrupted after BBBBB batches)."""
    match = _CHECKPOINT_NAME.search(Path(path).name)
    if match is None:
        return (-1, -1)
    return (int(match.group(1)), math.inf if match.group(2) is None else int(match.group(2)))


def list_checkpoints(checkpoint_dir) -> list[Path]:
    """The checkpoints of a folder, oldest first."""
    found = [p for p in Path(checkpoint_dir).glob("epoch_*.npz") if _CHECKPOINT_NAME.search(p.name)]
    return sorted(found, key=checkpoint_order)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(arrays by name, meta dict) of a checkpoint written by ``Trainer.save_checkpoint``.
    Raises CheckpointError (one message naming the file) when it is missing, truncated,
    corrupt or not a pycnn checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not magic:
        raise CheckpointError(f"{path} is empty, not a pycnn checkpoint")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a pycnn checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is not a pycnn checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as exc:
        raise CheckpointError(f"{path} has a corrupt 'meta' entry ({exc})") from None
    missing = [key for key in ("epoch", "history", "rng") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{path} is not a pycnn checkpoint (meta lacks {missing})")
    return arrays, meta
