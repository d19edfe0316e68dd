"""The training loop: epochs of mini-batch updates with a tqdm progress bar (loss, accuracy,
learning rate, images/s), validation after every epoch, a history, atomic checkpoints that
resume exactly, and early stopping when the loss becomes NaN or exceeds
``max_loss_ratio`` x its initial value (the CS231n sanity rule: the run has exploded).

Checkpoints are one ``.npz`` per epoch (no pickle: ``np.load(..., allow_pickle=False)``):
model parameters and buffers under ``model/``, optimiser state under ``optim/``, and a JSON
document under ``meta`` (epoch, history, schedule state, random-generator state, the model
spec and the run config).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import pycnn.functional as F
from pycnn import random as _random
from pycnn._backend import to_device, to_host
from pycnn.autograd import Tensor, no_grad


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or grew past max_loss_ratio x its initial value."""


class Trainer:
    def __init__(self, model, optimizer, train_loader, val_loader=None, *, schedule=None, loss: str = "cross_entropy",
                 label_smoothing: float = 0.0, class_weight=None, max_loss_ratio: float = 3.0,
                 checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, meta: dict | None = None,
                 attachments: dict | None = None, device: str = "cpu"):
        """``meta``: JSON-able facts stored in every checkpoint (model spec, config);
        ``attachments``: arrays stored with them (a fitted pre-processing, say);
        ``device``: 'cpu' or 'cuda' — the model is moved there and every batch follows it,
        so the same loop trains on NumPy or on CuPy arrays."""
        if loss not in ("cross_entropy", "hinge"):
            raise ValueError(f"loss must be 'cross_entropy' or 'hinge', got {loss!r}")
        self.device = device
        self.model, self.optimizer, self.schedule = model.to(device), optimizer, schedule
        self.train_loader, self.val_loader = train_loader, val_loader
        self.loss_name, self.label_smoothing, self.class_weight = loss, label_smoothing, class_weight
        self.max_loss_ratio = max_loss_ratio
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress
        self.meta = dict(meta or {})
        self.attachments = dict(attachments or {})
        self.epoch = 0
        self.history = {"batch_loss": [], "train_loss": [], "train_accuracy": [], "val_loss": [],
                        "val_accuracy": [], "lr": [], "epoch_seconds": [], "images_per_second": [], "stopped": None}

    # --------------------------------------------------------------------------- loss
    def loss(self, logits, labels):
        if self.loss_name == "hinge":
            return F.multiclass_hinge(logits, labels)
        return F.softmax_cross_entropy(logits, labels, label_smoothing=self.label_smoothing,
                                       class_weight=self.class_weight)

    # -------------------------------------------------------------------------- train
    def fit(self, epochs: int) -> dict:
        """Train until ``epochs`` epochs are done in total (a resumed trainer continues)."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        while self.epoch < epochs and self.history["stopped"] is None:
            try:
                self._train_epoch(epochs)
            except TrainingDiverged as exc:
                self.history["stopped"] = str(exc)
                if self.progress:
                    tqdm.write(f"stopped: {exc}")
                break
            if self.val_loader is not None:
                val_loss, val_accuracy = self.evaluate(self.val_loader)
                self.history["val_loss"].append(val_loss)
                self.history["val_accuracy"].append(val_accuracy)
            if self.schedule is not None:
                metric = self.history["val_accuracy"][-1] if self.val_loader is not None else \
                    self.history["train_accuracy"][-1]
                self.schedule.step_epoch(metric)
            self.epoch += 1
            if self.progress:
                val = (f", validation loss {self.history['val_loss'][-1]:.4f} accuracy "
                       f"{self.history['val_accuracy'][-1]:.4f}") if self.val_loader is not None else ""
                tqdm.write(f"epoch {self.epoch}: train loss {self.history['train_loss'][-1]:.4f} accuracy "
                           f"{self.history['train_accuracy'][-1]:.4f}{val}")
            if self.checkpoint_dir is not None:
                self.save_checkpoint(self.checkpoint_dir / f"epoch_{self.epoch:03d}.npz")
        return self.history

    def _train_epoch(self, epochs: int) -> None:
        self.model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(self.epoch)
        total_loss = correct = seen = 0
        start = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{epochs}", disable=not self.progress,
                   unit="batch", total=_length(self.train_loader), mininterval=0.5)
        for images, labels in bar:
            images, labels = to_device(images, self.device), to_device(labels, self.device)
            logits = self.model(Tensor(images))
            loss = self.loss(logits, labels)
            self.optimizer.zero_grad()
            loss.backward()
            value = loss.item()
            self._check_divergence(value)
            self.optimizer.step()
            if self.schedule is not None:
                self.schedule.step_batch()
            self.history["batch_loss"].append(value)
            n = len(labels)
            total_loss += value * n
            correct += int((to_host(logits.data).argmax(axis=1) == to_host(labels)).sum())
            seen += n
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{correct / seen:.3f}",
                            lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
        seconds = time.perf_counter() - start
        self.history["train_loss"].append(total_loss / max(seen, 1))
        self.history["train_accuracy"].append(correct / max(seen, 1))
        self.history["lr"].append(self.optimizer.param_groups[0]["lr"])
        self.history["epoch_seconds"].append(seconds)
        self.history["images_per_second"].append(seen / seconds if seconds else 0.0)

    def _check_divergence(self, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at epoch {self.epoch + 1}")
        losses = self.history["batch_loss"]
        initial = losses[0] if losses else value
        if losses and value > self.max_loss_ratio * initial:
            raise TrainingDiverged(f"the loss {value:.4g} exceeded {self.max_loss_ratio:g}x its initial value "
                                   f"{initial:.4g} at epoch {self.epoch + 1}: lower the learning rate")

    def evaluate(self, loader) -> tuple[float, float]:
        """(mean loss, accuracy) over a loader, in evaluation mode and without a graph."""
        self.model.eval()
        total_loss = correct = seen = 0
        with no_grad():
            for images, labels in loader:
                images, labels = to_device(images, self.device), to_device(labels, self.device)
                logits = self.model(Tensor(images))
                total_loss += self.loss(logits, labels).item() * len(labels)
                correct += int((to_host(logits.data).argmax(axis=1) == to_host(labels)).sum())
                seen += len(labels)
        self.model.train()
        if seen == 0:
            raise ValueError("the evaluation loader yielded no batches")
        return total_loss / seen, correct / seen

    # --------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Everything needed to resume, as a flat dict of arrays plus one JSON string."""
        arrays = dict(self.attachments)
        arrays.update({f"model/{k}": v for k, v in self.model.state_dict().items()})
        for key, value in self.optimizer.state_dict().items():
            arrays[f"optim/{key}"] = np.asarray(value)
        meta = {
            "epoch": self.epoch,
            "history": self.history,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "rng": _random.generator().bit_generator.state,
            **self.meta,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        return arrays

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically: a temporary file in the same folder, then rename,
        so a crash never leaves a half-written checkpoint under the final name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **self.state())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore model, optimiser, schedule, history and random state; returns the meta."""
        arrays, meta = read_checkpoint(path)
        self.model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
        optim_state["lr"] = [float(x) for x in optim_state["lr"]]
        self.optimizer.load_state_dict(optim_state)
        if self.schedule is not None and meta.get("schedule") is not None:
            self.schedule.load_state_dict(meta["schedule"])
        self.history = meta["history"]
        self.epoch = int(meta["epoch"])
        _random.generator().bit_generator.state = meta["rng"]
        return meta


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(arrays by name, meta dict) of a checkpoint written by ``Trainer.save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if "meta" not in arrays:
        raise ValueError(f"{path} is not a pycnn checkpoint (no 'meta' entry)")
    return arrays, json.loads(str(arrays.pop("meta")))


def _length(loader):
    try:
        return len(loader)
    except TypeError:
        return None
