"""One training run under a tool's control: ``train_config`` trains a ``Config`` in a folder
epoch by epoch and calls ``report(metrics)`` after each epoch, so a search can cut a hopeless
trial between epochs; it resumes from the folder's checkpoints after an
interruption.  ``load_predictor`` turns any pycnn checkpoint back into a model with its
pre-processing, for ensembles and per-class reports.

A trial folder (the same checkpoint format as ``pycnn train``, so ``pycnn evaluate`` reads it):

    DIR/config.json                 the trial's Config
    DIR/checkpoints/epoch_NNN.npz   the newest epoch and the best one (all with keep="all")
    DIR/curve.json                  per epoch: train loss / accuracy, validation loss /
                                    accuracy, learning rate, seconds
    DIR/outcome.json                status (finished / aborted), why, best epoch and score;
                                    written when the trial ends, absent while it can resume

Selection is by validation accuracy only (ties: the lower validation loss, as the Trainer
chooses its best epoch); the test set is not touched here.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from pycnn import data, models
from pycnn.autograd import Tensor, no_grad
from pycnn.data import preprocess
from pycnn.device import to_device, to_host
from pycnn.training.checkpoints import CheckpointError, list_checkpoints, read_checkpoint
from pycnn.training.config import Config
from pycnn.training.pipeline import BatchPipeline, augmentation, build, model_spec, split_data
from pycnn.training.rundir import prepare_run_dir, resume_from_newest
from pycnn.training.trainer import Trainer

FINISHED, ABORTED, INTERRUPTED = "finished", "aborted", "interrupted"


@dataclasses.dataclass
class Outcome:
    """How a trial ended: ``status`` is finished or aborted (diverged, or cut by the search's
    successive halving), or interrupted (Ctrl-C: it resumes from its checkpoints)."""
    status: str
    reason: str
    epochs: int                  # epochs completed
    best_epoch: int | None
    val_accuracy: float | None   # at the best epoch
    val_loss: float | None
    seconds: float
    images: int                  # training images processed (the cost)
    curve: list

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Outcome:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    @property
    def best_checkpoint(self) -> str | None:
        return None if self.best_epoch is None else f"checkpoints/epoch_{self.best_epoch:03d}.npz"


def read_outcome(folder) -> Outcome | None:
    path = Path(folder) / "outcome.json"
    if not path.is_file():
        return None
    return Outcome.from_dict(json.loads(path.read_text()))


def read_curve(folder) -> list:
    path = Path(folder) / "curve.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _curve(history: dict) -> list:
    rows = []
    for e in range(len(history["train_loss"])):
        rows.append({"epoch": e + 1, "train_loss": history["train_loss"][e],
                     "train_accuracy": history["train_accuracy"][e],
                     "val_loss": history["val_loss"][e] if e < len(history["val_loss"]) else None,
                     "val_accuracy": history["val_accuracy"][e] if e < len(history["val_accuracy"]) else None,
                     "lr": history["lr"][e], "seconds": history["epoch_seconds"][e]})
    return rows


def make_loaders(config: Config, train_x, train_y, val_x, val_y, preprocessor):
    """The training loader (augmentation, then ``preprocessor``; class-balanced sampling when
    ``config.balance`` says so) and the validation loader, as ``train.build`` makes them."""

    sampler = data.BalancedSampler(train_y, mode=config.balance, seed=config.seed) \
        if config.balance != "none" else None
    train_loader = data.DataLoader((train_x, train_y), config.batch_size, shuffle=True, seed=config.seed,
                                   transform=BatchPipeline(augmentation(config, train_x), preprocessor),
                                   sampler=sampler, prefetch=config.prefetch)
    val_loader = None
    if val_x is not None and len(val_x):
        val_loader = data.DataLoader((val_x, val_y), 256, shuffle=False, transform=preprocessor, prefetch=0)
    return train_loader, val_loader


def train_config(config: Config, folder, *, splits=None, report=None, resume: bool = True, class_weight=None,
                 schedule=None, init_state=None, preprocessor=None, keep: str = "best", progress: bool = False,
                 meta: dict | None = None) -> Outcome:
    """Train ``config`` in ``folder`` (see the module docstring) and return its Outcome.

    ``splits``: a ``train.Splits`` to train on (default: ``split_data(config)``; the imbalance
    tools pass a long-tailed one); ``report(metrics) -> bool``: called after every epoch with
    the epoch's metrics, False cuts the trial (aborted); ``resume``: continue from the newest
    readable checkpoint of ``folder`` (a finished trial is returned as it is); ``class_weight``:
    per-class weights of the cross-entropy; ``schedule(optimizer)``: a schedule instead of the
    config's; ``init_state``: model weights to start from (a fine-tune); ``preprocessor``: a
    fitted pre-processing to use instead of fitting one on the training images; ``keep``:
    'best' keeps the newest and the best epoch's checkpoints, 'all' every epoch's."""

    folder = Path(folder)
    done = read_outcome(folder) if resume else None
    if done is not None:
        return done
    splits = splits if splits is not None else split_data(config)
    prepare_run_dir(folder, resume=False)
    model, optimizer, own_schedule, train_loader, val_loader, fitted = build(
        config, splits.train_x, splits.train_y, splits.val_x, splits.val_y, classes=splits.classes)
    if preprocessor is not None:
        train_loader, val_loader = make_loaders(config, splits.train_x, splits.train_y, splits.val_x,
                                                splits.val_y, preprocessor)
    preprocessor = preprocessor if preprocessor is not None else fitted
    if init_state is not None:
        model.load_state_dict(init_state)
    spec = model_spec(config, splits.train_x.shape[1], splits.train_x.shape[2], splits.classes)
    weight = None
    if class_weight is not None:
        weight = to_device(np.asarray(class_weight, dtype=np.float32), config.device)
    trainer = Trainer(model, optimizer, train_loader, val_loader,
                      schedule=schedule(optimizer) if schedule is not None else own_schedule,
                      loss=config.loss, label_smoothing=config.label_smoothing, class_weight=weight,
                      checkpoint_dir=folder / "checkpoints", progress=progress, device=config.device,
                      early_stop=config.early_stop,
                      meta={"model": spec, "config": config.to_dict(), **(meta or {})},
                      attachments={f"preprocess/{k}": v for k, v in preprocessor.state_dict().items()})
    if resume:
        resume_from_newest(trainer, folder, log=lambda *a, **k: None)
    else:
        for stale in list_checkpoints(folder / "checkpoints"):
            stale.unlink()
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    h = trainer.history
    status, reason = FINISHED, ""
    if h["stopped"] is not None:  # resumed after the last epoch of a diverged trial
        status, reason = ABORTED, f"diverged: {h['stopped']}"
    first = config.epochs + 1 if h["stopped"] is not None or h["early_stopped"] is not None else trainer.epoch + 1
    for epoch in range(first, config.epochs + 1):
        trainer.fit(epoch)
        if h["interrupted"] is not None:
            status, reason = INTERRUPTED, f"interrupted in epoch {epoch}: resumes from {h['interrupted']}"
            break
        if h["stopped"] is not None:
            status, reason = ABORTED, f"diverged: {h['stopped']}"
            break
        _prune(folder / "checkpoints", trainer.epoch, h["best_epoch"], keep)
        curve = _curve(h)
        (folder / "curve.json").write_text(json.dumps(curve, indent=1))
        if report is not None:
            last = curve[-1]
            best = h["best_epoch"]
            metrics = {**last, "best_val_accuracy": h["val_accuracy"][best - 1] if h["val_accuracy"] else None}
            if report(metrics) is False:
                status, reason = ABORTED, f"cut by successive halving after epoch {epoch}"
                break
        if h["early_stopped"] is not None:
            reason = f"early stop: {h['early_stopped']}"
            break
    per_epoch = len(train_loader.sampler) if train_loader.sampler is not None else len(splits.train_y)
    outcome = outcome_of(h, status, reason, per_epoch)
    if status != INTERRUPTED:
        write_outcome(folder, outcome)
    return outcome


def outcome_of(history: dict, status: str, reason: str, images_per_epoch: int) -> Outcome:
    best = history["best_epoch"]
    has_val = bool(history["val_accuracy"]) and best is not None
    return Outcome(status=status, reason=reason, epochs=len(history["train_loss"]), best_epoch=best,
                   val_accuracy=history["val_accuracy"][best - 1] if has_val else None,
                   val_loss=history["val_loss"][best - 1] if has_val else None,
                   seconds=float(sum(history["epoch_seconds"])),
                   images=int(images_per_epoch * len(history["train_loss"])), curve=_curve(history))


def write_outcome(folder, outcome: Outcome) -> None:
    path = Path(folder) / "outcome.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome.to_dict(), indent=1))
    tmp.replace(path)


def _prune(checkpoints: Path, epoch: int, best: int | None, keep: str) -> None:
    if keep == "all":
        return
    wanted = {f"epoch_{epoch:03d}.npz"} | ({f"epoch_{best:03d}.npz"} if best else set())
    for path in list_checkpoints(checkpoints):
        if path.name not in wanted:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ predictors

@dataclasses.dataclass
class Predictor:
    """A trained model with the pre-processing and the config it was trained with."""
    name: str
    model: object
    preprocessor: object
    config: Config
    path: str

    def probabilities(self, images, batch_size: int = 256) -> np.ndarray:
        """Softmax probabilities (N, classes) of uint8 images (N, C, H, W), evaluation mode."""

        self.model.eval()
        out = []
        with no_grad():
            for start in range(0, len(images), batch_size):
                x = self.preprocessor(images[start:start + batch_size]).astype(np.float32, copy=False)
                logits = to_host(self.model(Tensor(to_device(x, self.config.device))).data).astype(np.float64)
                logits -= logits.max(axis=1, keepdims=True)
                e = np.exp(logits)
                out.append(e / e.sum(axis=1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, 0))


def load_predictor(path, name: str | None = None, device: str | None = None) -> Predictor:
    """The model, pre-processing and config stored in a pycnn checkpoint (CheckpointError
    naming the file when it is not usable)."""
    arrays, meta = read_checkpoint(path)
    try:
        model = models.build(meta["model"])
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        prep = preprocess.from_state_dict({k[len("preprocess/"):]: v for k, v in arrays.items()
                                           if k.startswith("preprocess/")})
        config = Config.from_dict(meta["config"], **({"device": device} if device else {}))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a usable pycnn checkpoint ({type(exc).__name__}: {exc})") from None
    model.to(config.device)
    return Predictor(name or str(path), model, prep, config, str(path))


def timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


_SPLITS: dict = {}


def cached_splits(config: Config):
    """split_data once per data setting in this process (trials differ in other settings)."""
    key = (config.dataset, config.classes, config.limit, config.val_size)
    if key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[key] = split_data(config)
    return _SPLITS[key]
