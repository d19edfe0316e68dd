"""The training loop: epochs of mini-batch updates with a tqdm progress bar on a terminal (loss, accuracy,
learning rate, images/s), validation after every epoch, a history, atomic checkpoints that
resume exactly, and three ways to stop early:

* the loss becomes NaN or exceeds ``max_loss_ratio`` x its initial value (the CS231n sanity
  rule: the run has exploded; ``history["stopped"]``);
* the validation score has not improved for ``early_stop`` epochs (``history["early_stopped"]``);
* Ctrl-C (SIGINT): the current batch is finished, a checkpoint of the position inside the
  epoch is written (``epoch_NNN_part_BBBBB.npz``) and ``fit`` returns with
  ``history["interrupted"]`` set; resuming from it gives the run an uninterrupted one would
  have given.  A second Ctrl-C quits at once (``KeyboardInterrupt``).

The logged training loss is the objective the optimizer descends: the data loss (cross-
entropy or hinge, a mean over the batch) plus the regularisation term of the optimizer's
parameter groups, ``0.5 * weight_decay * |w|^2 + l1 * |w|_1`` (its gradient is what the
optimizer adds); both parts are logged too.  The validation loss is the data loss alone.

After every epoch the validation accuracy (ties: the lower validation loss) chooses the best
epoch (``history["best_epoch"]``, 1-based; ``best_state()`` gives its weights).

Checkpoints are one ``.npz`` per epoch (no pickle: ``np.load(..., allow_pickle=False)``):
model parameters and buffers under ``model/``, optimizer state under ``optim/``, and a JSON
document under ``meta`` (epoch, history, schedule state, random-generator state, the model
spec and the run config).  ``read_checkpoint`` turns any unreadable file into one
``CheckpointError`` naming the file.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import pycnn.functional as F
from pycnn import random as _random
from pycnn.autograd import Tensor, no_grad
from pycnn.cuda_graph import GraphedStep
from pycnn.device import array_module, is_cuda_array, to_device, to_host
from pycnn.ops import cuda_backend
from pycnn.training.checkpoints import CheckpointError, read_checkpoint
from pycnn.training.diagnostics import LayerDiagnostics


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or grew past max_loss_ratio x its initial value."""


def _new_history() -> dict:
    return {"batch_loss": [], "batch_data_loss": [], "batch_lr": [],
            "train_loss": [], "train_data_loss": [], "train_reg_loss": [], "train_accuracy": [],
            "val_loss": [], "val_accuracy": [], "lr": [], "epoch_seconds": [], "images_per_second": [],
            "best_epoch": None, "stopped": None, "early_stopped": None, "interrupted": None, "test": None,
            "val_images": None, "diagnostics": []}


def regularisation_loss(optimizer) -> float:
    """The regularisation term of the optimizer's groups at the current weights:
    sum of ``0.5 * weight_decay * |w|^2 + l1 * |w|_1`` over the parameters it updates."""
    return start_regularisation_loss(optimizer)()


def start_regularisation_loss(optimizer):
    """``regularisation_loss`` in two halves: the work is queued now, the returned function
    gives the value.  Host parameters are summed here, as always; CUDA parameters on the
    device (one launch per 32 of them, pycnn.kernels.optim.sum_squares_and_abs), read back
    in one copy when the value is asked for, instead of one host synchronisation per
    parameter."""
    total = 0.0
    on_device = []  # (flat weights, weight decay, l1) of the CUDA parameters
    for group in optimizer.param_groups:
        decay, l1 = group.get("weight_decay", 0.0), group.get("l1", 0.0)
        if not (decay or l1):
            continue
        for p in group["params"]:
            if not getattr(p, "requires_grad", True):
                continue
            flat = p.data.reshape(-1)
            if is_cuda_array(flat):
                on_device.append((flat, decay, l1))
                continue
            if decay:
                total += 0.5 * decay * float(array_module(flat).dot(flat, flat))
            if l1:
                total += l1 * float(array_module(flat).abs(flat).sum())
    if not on_device:
        return lambda: total
    parts, finish = cuda_backend.optimizer_kernels().sum_squares_and_abs([flat for flat, _, _ in on_device])

    def value() -> float:
        sums = finish(to_host(parts))  # (parameters, 2): sum of w^2, sum of |w|, in float64
        device_total = 0.0
        for (_, decay, l1), (squares, absolute) in zip(on_device, sums):
            device_total += 0.5 * decay * float(squares) + l1 * float(absolute)
        return total + device_total
    return value


class Trainer:
    def __init__(self, model, optimizer, train_loader, val_loader=None, *, schedule=None, loss: str = "cross_entropy",
                 label_smoothing: float = 0.0, class_weight=None, max_loss_ratio: float = 3.0,
                 checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, meta: dict | None = None,
                 attachments: dict | None = None, device: str = "cpu", early_stop: int = 0,
                 on_first_batch=None, diagnostics_every: int = 0, cuda_graph: bool = False):
        """``val_loader``: the validation set (never the test set): it drives the plateau
        schedule, early stopping and the choice of the best epoch;
        ``meta``: JSON-able facts stored in every checkpoint (model spec, config);
        ``attachments``: arrays stored with them (a fitted pre-processing, say);
        ``device``: 'cpu' or 'cuda' — the model is moved there and every batch follows it;
        ``early_stop``: stop after this many epochs without a better validation score (0: off);
        ``on_first_batch(data_loss, reg_loss)``: called once after the run's first batch;
        ``diagnostics_every``: per-layer readings every this many steps into
        ``history["diagnostics"]`` (0: off; see ``pycnn.training.diagnostics``);
        ``cuda_graph``: on device 'cuda', replay each step (forward, backward, update) as a
        captured CUDA graph (``pycnn.cuda_graph``): the same numbers, without Python's launch
        overhead; the divergence check then reads the loss after the update, not before."""
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
        self.early_stop = int(early_stop)
        self.on_first_batch = on_first_batch
        self.diagnostics = None
        if diagnostics_every:
            self.diagnostics = LayerDiagnostics(diagnostics_every)
        self._graphed = None
        if cuda_graph:
            self._graphed = GraphedStep(self._whole_step, optimizer=optimizer, model=self.model)
        self.epoch = 0
        self.history = _new_history()
        self._position = None          # (batches done, partial sums) inside the current epoch
        self._best_state = None
        self._interrupt_requested = False
        self._evaluated = None         # images seen by the last evaluate()

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
        h = self.history
        self._interrupt_requested = False
        with self._catch_interrupt():
            while (self.epoch < epochs and h["stopped"] is None and h["early_stopped"] is None
                   and h["interrupted"] is None):
                if self._interrupt_requested:
                    h["interrupted"] = str(self._latest_path()) if self._latest_path() else f"epoch {self.epoch}"
                    break
                try:
                    finished = self._train_epoch(epochs)
                except TrainingDiverged as exc:  # said once, by the caller (pycnn train: "stopped early: ...")
                    h["stopped"] = str(exc)
                    break
                if not finished:
                    break
                self._end_epoch()
        return h

    def _end_epoch(self) -> None:
        h = self.history
        if self.val_loader is not None:
            val_loss, val_accuracy = self.evaluate(self.val_loader)
            h["val_loss"].append(val_loss)
            h["val_accuracy"].append(val_accuracy)
            h["val_images"] = self._evaluated  # how noisy the validation accuracy is (report.py)
        if self.schedule is not None:
            self.schedule.step_epoch(h["val_accuracy"][-1] if self.val_loader is not None else h["train_accuracy"][-1])
        self.epoch += 1
        improved = self._update_best()
        if self.progress:
            val = (f", validation loss {h['val_loss'][-1]:.4f} accuracy {h['val_accuracy'][-1]:.4f}"
                   f"{' (best)' if improved else ''}") if self.val_loader is not None else ""
            tqdm.write(f"epoch {self.epoch}: train loss {h['train_loss'][-1]:.4f} (data {h['train_data_loss'][-1]:.4f}"
                       f" + regularisation {h['train_reg_loss'][-1]:.4f}) accuracy {h['train_accuracy'][-1]:.4f}{val}")
        if self.early_stop and self.val_loader is not None and self.epoch - h["best_epoch"] >= self.early_stop:
            h["early_stopped"] = (f"no better validation accuracy for {self.early_stop} epochs after epoch "
                                  f"{h['best_epoch']}")
            if self.progress:
                tqdm.write(f"early stop: {h['early_stopped']}")
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir / f"epoch_{self.epoch:03d}.npz")
            for stale in self.checkpoint_dir.glob(f"epoch_{self.epoch:03d}_part_*.npz"):
                stale.unlink(missing_ok=True)

    def _update_best(self) -> bool:
        h = self.history
        if self.val_loader is None:
            h["best_epoch"] = self.epoch  # no validation set: nothing to choose by, the last epoch counts
            self._best_state = None
            return False
        best = h["best_epoch"]
        score = (h["val_accuracy"][-1], -h["val_loss"][-1])
        if best is None or score > (h["val_accuracy"][best - 1], -h["val_loss"][best - 1]):
            h["best_epoch"] = self.epoch
            self._best_state = self.model.state_dict()
            return True
        return False

    def best_state(self) -> dict:
        """The model state (parameters and buffers) of the best epoch: the current one where
        there is no validation set or nothing better was seen."""
        return self._best_state if self._best_state is not None else self.model.state_dict()

    def _train_epoch(self, epochs: int) -> bool:
        """One epoch (or the rest of one); False when it was interrupted."""
        self.model.train()
        start_batch, sums = self._position or (0, {"loss": 0.0, "data_loss": 0.0, "correct": 0, "seen": 0,
                                                    "seconds": 0.0})
        self._position = None
        batches = self._epoch_batches(start_batch)
        h = self.history
        start = time.perf_counter() - sums["seconds"]
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{epochs}", disable=not self._bar(), unit="batch",
                   total=_length(self.train_loader), initial=start_batch, mininterval=0.5)
        done = start_batch
        for images, labels in bar:
            images, labels = to_device(images, self.device), to_device(labels, self.device)
            step = len(h["batch_loss"])
            diagnose = self.diagnostics is not None and self.diagnostics.due(step)
            h["batch_lr"].append(self.optimizer.param_groups[0]["lr"])
            if self._graphed is not None and not diagnose:
                loss, logits, reg_loss = self._graphed(images, labels)  # the update is done
                data_loss = loss.item()
                reg_value = reg_loss()
                value = data_loss + reg_value
                self._check_divergence(value, data_loss)
            else:
                logits = self.diagnostics.forward(self.model, Tensor(images), step) if diagnose else \
                    self.model(Tensor(images))
                loss = self.loss(logits, labels)
                self.optimizer.zero_grad()
                loss.backward()
                reg_loss = start_regularisation_loss(self.optimizer)  # queued before the loss's read: one wait
                data_loss = loss.item()
                reg_value = reg_loss()
                value = data_loss + reg_value
                self._check_divergence(value, data_loss)
                if diagnose:
                    self.diagnostics.before_step(self.model)
                self.optimizer.step()
                if diagnose:
                    self.diagnostics.after_step(h)
            if self.schedule is not None:
                self.schedule.step_batch()
            h["batch_loss"].append(value)
            h["batch_data_loss"].append(data_loss)
            n = len(labels)
            sums["loss"] += value * n
            sums["data_loss"] += data_loss * n
            sums["correct"] += int((to_host(logits.data).argmax(axis=1) == to_host(labels)).sum())
            sums["seen"] += n
            done += 1
            if len(h["batch_loss"]) == 1 and self.on_first_batch is not None:
                self.on_first_batch(data_loss, reg_value)
            seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}",
                            lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                            img_s=f"{sums['seen'] / max(seconds, 1e-9):.0f}", refresh=False)
            if self._interrupt_requested:
                bar.close()
                sums["seconds"] = time.perf_counter() - start
                self._position = (done, sums)
                path = None
                if self.checkpoint_dir is not None:
                    path = self.save_checkpoint(self.checkpoint_dir / f"epoch_{self.epoch + 1:03d}_part_{done:05d}.npz")
                h["interrupted"] = str(path) if path else f"epoch {self.epoch + 1} after batch {done}"
                return False
        seen = max(sums["seen"], 1)
        seconds = time.perf_counter() - start
        h["train_loss"].append(sums["loss"] / seen)
        h["train_data_loss"].append(sums["data_loss"] / seen)
        h["train_reg_loss"].append((sums["loss"] - sums["data_loss"]) / seen)
        h["train_accuracy"].append(sums["correct"] / seen)
        h["lr"].append(self.optimizer.param_groups[0]["lr"])
        h["epoch_seconds"].append(seconds)
        h["images_per_second"].append(sums["seen"] / seconds if seconds else 0.0)
        return True

    def _bar(self) -> bool:
        """The per-batch progress bar only on a terminal: a log file gets the one line per epoch."""
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(self.progress and isatty is not None and isatty())

    def _whole_step(self, images, labels):
        """One training step as one function (what ``cuda_graph`` captures): (loss, logits,
        the regularisation term's reader), the update done."""
        logits = self.model(images)
        loss = self.loss(logits, labels)
        self.optimizer.zero_grad()
        loss.backward()
        reg_loss = start_regularisation_loss(self.optimizer)  # of the weights before the update
        self.optimizer.step()
        return loss, logits, reg_loss

    def _epoch_batches(self, start_batch: int):
        """The training batches of the current epoch from ``start_batch`` on."""
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            try:
                loader.set_epoch(self.epoch, start_batch=start_batch)
                return loader
            except TypeError:  # a loader without start_batch: skip the batches already done
                loader.set_epoch(self.epoch)
        return itertools.islice(iter(loader), start_batch, None)

    @contextlib.contextmanager
    def _catch_interrupt(self):
        """While training, the first SIGINT asks to stop after the current batch; the second
        raises KeyboardInterrupt as usual.  Only in the main thread (where signals arrive)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            if self.progress:
                tqdm.write("interrupted: finishing the current batch and saving a checkpoint "
                           "(Ctrl-C again to quit at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def _latest_path(self):
        if self.checkpoint_dir is None or self.epoch == 0:
            return None
        path = self.checkpoint_dir / f"epoch_{self.epoch:03d}.npz"
        return path if path.is_file() else None

    def _check_divergence(self, value: float, data_loss: float) -> None:
        """TrainingDiverged when the loss is not finite or grew past max_loss_ratio x its initial
        value; the diverging batch's loss is kept in the history (loss.png shows it)."""
        losses = self.history["batch_loss"]
        initial = losses[0] if losses else value
        if math.isfinite(value) and not (losses and value > self.max_loss_ratio * initial):
            return
        self.history["batch_loss"].append(value)
        self.history["batch_data_loss"].append(data_loss)
        advice = ("lower the learning rate (--lr) or warm it up over more steps (--warmup-steps)" if
                  self.optimizer.param_groups[0].get("lr", 0) > 0 else "check the data and the loss")
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at epoch {self.epoch + 1} (step "
                                   f"{len(losses)}): {advice}")
        raise TrainingDiverged(f"the loss {value:.4g} exceeded {self.max_loss_ratio:g}x its initial value "
                               f"{initial:.4g} at epoch {self.epoch + 1}: {advice}")

    def evaluate(self, loader) -> tuple[float, float]:
        """(mean data loss, accuracy) over a loader, in evaluation mode and without a graph."""
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
        self._evaluated = seen
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
            "position": None if self._position is None else {"batch": self._position[0], "sums": self._position[1]},
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
        """Restore model, optimizer, schedule, history, random state and the position inside
        an interrupted epoch; returns the meta.  Raises CheckpointError when the file does
        not fit this trainer (its model, its optimizer)."""
        arrays, meta = read_checkpoint(path)
        try:
            self.model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
            optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
            optim_state["lr"] = [float(x) for x in optim_state["lr"]]
            self.optimizer.load_state_dict(optim_state)
            if self.schedule is not None and meta.get("schedule") is not None:
                self.schedule.load_state_dict(meta["schedule"])
            history = _new_history()
            history.update(meta["history"])
            epoch = int(meta["epoch"])
            position = meta.get("position")
            _random.generator().bit_generator.state = meta["rng"]
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path} does not fit this run ({type(exc).__name__}: {exc})") from None
        history["interrupted"] = None
        self.history, self.epoch = history, epoch
        self._position = None if position is None else (int(position["batch"]), dict(position["sums"]))
        self._best_state = None
        best = history.get("best_epoch")
        if best is not None and self.val_loader is not None and self.checkpoint_dir is not None:
            best_path = self.checkpoint_dir / f"epoch_{best:03d}.npz"
            with contextlib.suppress(CheckpointError):
                best_arrays, _ = read_checkpoint(best_path)
                self._best_state = {k[len("model/"):]: v for k, v in best_arrays.items() if k.startswith("model/")}
        return meta


def _length(loader):
    try:
        return len(loader)
    except TypeError:
        return None
