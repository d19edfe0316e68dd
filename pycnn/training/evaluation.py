"""Scoring a checkpoint, or a run directory's best one, on a split: loss, accuracy,
per-class accuracy and the confusion matrix (``pycnn evaluate``)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pycnn import data, models, optim
from pycnn.autograd import Tensor, no_grad
from pycnn.data import datasets, preprocess
from pycnn.training.checkpoints import CheckpointError, list_checkpoints, read_checkpoint
from pycnn.training.config import Config, ConfigError
from pycnn.training.pipeline import split_data
from pycnn.training.rundir import newest_meta, run_contents
from pycnn.training.trainer import Trainer


def evaluate_checkpoint(path, dataset: str | None = None, split: str = "test") -> tuple[float, float]:
    """(loss, accuracy) of a checkpoint (or a run directory's best one) on a split; see
    ``evaluate``."""
    result = evaluate(path, dataset, split)
    return result.loss, result.accuracy


def confusion_matrix(predicted, labels, classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    return np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)


def class_names(config: Config, classes: int) -> list[str]:
    """The names of labels 0..classes-1 of a run: its ``classes`` (the original labels) when it
    chose some, CIFAR-10's words for cifar10."""
    original = list(config.classes) or list(range(classes))
    if config.dataset == "cifar10":
        return [datasets.CIFAR10_CLASSES[i] for i in original]
    return [str(i) for i in original]


def best_checkpoint(path) -> Path:
    """The checkpoint PATH names: PATH itself when it is a file; for a run directory, its best
    epoch's checkpoint by validation (history.json's best epoch, else the newest checkpoint's).
    CheckpointError naming PATH when it holds none."""
    path = Path(path)
    if not path.is_dir():
        return path
    if run_contents(path) and not list_checkpoints(path / "checkpoints") and list(path.glob("fold_*")):
        raise CheckpointError(f"{path} is a cross-validation run: evaluate one fold's run directory, such as "
                              f"{path / 'fold_1'}")
    best = None
    if (path / "history.json").is_file():
        try:
            best = json.loads((path / "history.json").read_text()).get("best_epoch")
        except (OSError, ValueError):
            best = None
    if best is None:
        meta = newest_meta(path)
        best = meta["history"].get("best_epoch") if meta else None
    if best is None:
        raise CheckpointError(f"{path} holds no finished epoch's checkpoint: expected a run directory (pycnn train "
                              "--run-dir) or a checkpoint file")
    chosen = path / "checkpoints" / f"epoch_{int(best):03d}.npz"
    if not chosen.is_file():
        raise CheckpointError(f"{path}: the best epoch's checkpoint {chosen} is missing; name a checkpoint file")
    return chosen


@dataclasses.dataclass
class Evaluation:
    """A checkpoint scored on a split: loss, accuracy, the confusion matrix (rows: true class,
    columns: predicted) and the names of the classes."""
    checkpoint: Path
    epoch: int
    best_epoch: int | None
    dataset: str
    split: str
    loss: float
    accuracy: float
    matrix: np.ndarray
    names: list

    @property
    def images(self) -> int:
        return int(self.matrix.sum())

    @property
    def per_class(self) -> np.ndarray:
        return per_class_accuracy(self.matrix)

    def summary(self) -> str:
        which = ("the best epoch by validation accuracy" if self.epoch == self.best_epoch else
                 f"the run's best by validation was epoch {self.best_epoch}" if self.best_epoch else "")
        lines = [f"{self.checkpoint} (epoch {self.epoch}{': ' + which if which else ''}): {self.dataset} {self.split}, "
                 f"{self.images} images: loss {self.loss:.4f}, accuracy {self.accuracy:.4f}",
                 "per-class accuracy (images):"]
        counts = self.matrix.sum(axis=1)
        width = max(len(n) for n in self.names)
        for name, accuracy, count in zip(self.names, self.per_class, counts):
            lines.append(f"  {name:>{width}}  {accuracy:.4f} ({count})")
        cell = max(4, len(str(int(self.matrix.max(initial=0)))) + 1, *(len(n) + 1 for n in self.names))
        lines.append("confusion matrix (rows: true class, columns: predicted):")
        lines.append(" " * (width + 2) + "".join(f"{n:>{cell}}" for n in self.names))
        for name, row in zip(self.names, self.matrix):
            lines.append(f"  {name:>{width}}" + "".join(f"{int(v):>{cell}}" for v in row))
        return "\n".join(lines)


def evaluate(path, dataset: str | None = None, split: str = "test") -> Evaluation:
    """Score a checkpoint (or a run directory's best one, ``best_checkpoint``) on a split
    ('test', 'val' or 'train') of the dataset it was trained on (``dataset`` overrides), with
    the pre-processing and the validation split recorded in it.  CheckpointError for an
    unreadable file, ConfigError for a dataset the model does not fit."""
    if split not in ("test", "val", "train"):
        raise ConfigError(f"split must be one of test, val, train; got {split!r}")
    path = best_checkpoint(path)
    arrays, meta = read_checkpoint(path)
    try:
        saved = meta["config"]
        spec = meta["model"]
        model = models.build(spec)
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        preprocessor = preprocess.from_state_dict(
            {k[len("preprocess/"):]: v for k, v in arrays.items() if k.startswith("preprocess/")})
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a usable pycnn checkpoint ({type(exc).__name__}: {exc})") from None
    config = Config.from_dict(saved, **({"dataset": dataset} if dataset else {}))
    splits = split_data(config)
    images, labels = {"test": (splits.test_x, splits.test_y), "val": (splits.val_x, splits.val_y),
                      "train": (splits.train_x, splits.train_y)}[split]
    shape = (spec.get("in_channels"), spec.get("image_size"))
    if images.shape[1:3] != shape or splits.classes > spec.get("classes", 0):
        raise ConfigError(f"dataset: the checkpoint's model takes {shape[0]}x{shape[1]}x{shape[1]} images of "
                          f"{spec.get('classes')} classes; {config.dataset} has {images.shape[1]}x{images.shape[2]}x"
                          f"{images.shape[3]} images of {splits.classes} classes")
    if not len(labels):
        raise ConfigError("split val: this run had no validation set (val_size 0)")
    loader = data.DataLoader((images, labels), 256, shuffle=False, transform=preprocessor, prefetch=0)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=1.0), loader, progress=False,
                      loss=saved.get("loss", "cross_entropy"))
    model.eval()
    total, predicted = 0.0, []
    with no_grad():
        for batch, batch_labels in loader:
            logits = model(Tensor(batch))
            total += trainer.loss(logits, batch_labels).item() * len(batch_labels)
            predicted.append(np.asarray(logits.data).argmax(axis=1))
    predicted = np.concatenate(predicted)
    classes = int(spec.get("classes", splits.classes))
    matrix = confusion_matrix(predicted, labels, classes)
    return Evaluation(checkpoint=path, epoch=int(meta["epoch"]), best_epoch=meta["history"].get("best_epoch"),
                      dataset=config.dataset, split=split, loss=total / len(labels),
                      accuracy=float((predicted == labels).mean()), matrix=matrix,
                      names=class_names(config, classes))


def figure_path(evaluation: Evaluation) -> Path:
    """Where ``pycnn evaluate`` draws the confusion matrix: in the checkpoint's run directory
    (beside checkpoints/), named after the split and the checkpoint."""
    folder = evaluation.checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"confusion_{evaluation.split}_{evaluation.checkpoint.stem}.png"
