"""Fine-tuning and transfer (CS231n lecture 6; the tips' table): start from a trained network,
freeze the early layers, give the rest smaller learning rates, replace the head, or train a
linear classifier (softmax or SVM) on the features of any layer.

    model = finetune.load_model("runs/a/checkpoints/epoch_010.npz")
    finetune.replace_head(model, classes=5)
    finetune.freeze(model, up_to=4)                      # layers 0..3 keep their weights
    groups = finetune.layerwise_lr_groups(model, lr=0.01, decay=0.5)
    opt = optim.SGD(groups, lr=0.01, momentum=0.9)

A frozen layer is frozen for good: its parameters get no gradient and it always runs in
evaluation mode, so batch norm normalises with its running statistics and never updates
them, and dropout or RReLU among the frozen layers do nothing random.

``PRESETS`` are the four strategies of the table, by the size of the new data set and its
similarity to the data the network was trained on, run end to end by ``run_preset`` (and
``pycnn finetune CHECKPOINT --preset NAME``):

| preset          | new data | task      | what is trained                                       |
|-----------------|----------|-----------|-------------------------------------------------------|
| similar-small   | small    | similar   | a linear classifier on the top features               |
| similar-large   | large    | similar   | the last stage and a new head, small learning rate    |
| different-small | small    | different | a linear SVM on early features (end of stage 1)       |
| different-large | large    | different | every layer and a new head, small learning rate       |
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

import pycnn
import pycnn.functional as F
from pycnn import data, models, nn, optim, schedules
from pycnn.autograd import Tensor, no_grad
from pycnn.data import preprocess
from pycnn.training import figures, report
from pycnn.training.checkpoints import CheckpointError, read_checkpoint
from pycnn.training.config import Config, ConfigError, check_device
from pycnn.training.pipeline import BatchPipeline, augmentation, split_data
from pycnn.training.rundir import check_run_dir, prepare_run_dir
from pycnn.training.runs import score_on_test, write_history
from pycnn.training.trainer import Trainer


class FinetuneStopped(RuntimeError):
    """Fine-tuning ended before its last epoch (diverged, or interrupted)."""


def load_model(checkpoint) -> nn.Sequential:
    """The model stored in a checkpoint written by ``pycnn train``, with its weights."""
    arrays, meta = read_checkpoint(checkpoint)
    try:
        model = models.build(meta["model"])
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint} is not a usable pycnn checkpoint ({type(exc).__name__}: {exc})") from None
    return model


def _check_sequential(model) -> None:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")


# ------------------------------------------------------------------------------ freezing

_FROZEN_CLASSES: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``training`` is always False (a data descriptor, so
    ``Module.train()`` on any enclosing model cannot switch it back)."""
    if cls not in _FROZEN_CLASSES:
        _FROZEN_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_unfrozen_class": cls,
            "training": property(lambda self: False, lambda self, mode: None,
                                 doc="always False: a frozen layer runs in evaluation mode")})
    return _FROZEN_CLASSES[cls]


def is_frozen(layer) -> bool:
    return "_unfrozen_class" in type(layer).__dict__


def freeze(model: nn.Sequential, up_to: int) -> None:
    """Freeze layers [0, up_to) and unfreeze the rest: frozen parameters no longer require
    gradients, and frozen layers (and the modules inside them) stay in evaluation mode —
    batch norm uses and keeps its running statistics, dropout and RReLU are deterministic."""
    _check_sequential(model)
    if isinstance(up_to, bool) or not isinstance(up_to, (int, np.integer)) or not 0 <= up_to <= len(model):
        raise ValueError(f"up_to must be an integer in [0, {len(model)}], got {up_to!r}")
    for index, layer in enumerate(model):
        frozen = index < up_to
        for p in layer.parameters():
            p.requires_grad = not frozen
        for _, module in layer.named_modules():
            if frozen and not is_frozen(module):
                module.__class__ = _frozen_class(type(module))
            elif not frozen and is_frozen(module):
                module.__class__ = type(module)._unfrozen_class
                object.__setattr__(module, "training", model.training)


def layerwise_lr_groups(model: nn.Sequential, lr: float, decay: float = 0.5) -> list[dict]:
    """Parameter groups whose learning rate shrinks by ``decay`` per parametrised layer from
    the head backwards: the last layer gets ``lr``, the one before ``lr * decay``, ...
    Frozen parameters are left out."""
    _check_sequential(model)
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) or not 0 < lr < np.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    layers = [layer for layer in model if any(p.requires_grad for p in layer.parameters())]
    groups = []
    for depth, layer in enumerate(reversed(layers)):
        params = [p for p in layer.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": lr * decay ** depth})
    return groups[::-1]


def replace_head(model: nn.Sequential, classes: int, rng=None) -> nn.Linear:
    """Swap the last Linear layer for a new one with ``classes`` outputs (Xavier-initialised,
    at ``models.HEAD_GAIN`` of its scale so that the new head starts near ln(classes))."""
    _check_sequential(model)
    for index in range(len(model) - 1, -1, -1):
        if isinstance(model[index], nn.Linear):
            old = model[index]
            head = nn.Linear(old.in_features, classes, init_scheme="xavier", rng=rng)
            head.weight.data *= np.float32(models.HEAD_GAIN)
            setattr(model, str(index), head)
            return head
    raise ValueError("model has no Linear layer to replace")


# ------------------------------------------------------------------------ linear probes

def features(model: nn.Sequential, layer: int, images, batch_size: int = 256) -> np.ndarray:
    """The flattened output of layer ``layer`` (inclusive) for float32 images (N, C, H, W),
    computed in evaluation mode: (N, features)."""
    _check_sequential(model)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < len(model):
        raise ValueError(f"layer must be an integer in [0, {len(model) - 1}], got {layer!r}")
    was_training = model.training
    model.eval()
    out = []
    try:
        with no_grad():
            for start in range(0, len(images), batch_size):
                x = Tensor(images[start:start + batch_size])
                for block in list(model)[:layer + 1]:
                    x = block(x)
                out.append(x.numpy().reshape(len(x.data), -1))
    finally:
        model.train(was_training)  # the caller's mode, as it was
    return np.concatenate(out)


def linear_probe(train_features, train_labels, classes: int, epochs: int = 30, lr: float = 0.1,
                 weight_decay: float = 1e-4, batch_size: int = 128, seed: int = 0,
                 loss: str = "softmax") -> nn.Linear:
    """A linear classifier trained on fixed features (standardised inside: the returned
    layer's weights already include that scaling).  ``loss``: 'softmax' (cross-entropy) or
    'svm' (the multiclass hinge loss, margin 1: a linear SVM; weight decay is its L2 term)."""
    if loss not in ("softmax", "svm"):
        raise ValueError(f"loss must be 'softmax' or 'svm', got {loss!r}")
    if len(train_labels) != len(train_features):
        raise ValueError(f"train_labels must have one label per feature row ({len(train_features)}), "
                         f"got {len(train_labels)}")
    train_features = np.asarray(train_features, np.float32)
    labels = np.asarray(train_labels)
    mean, std = train_features.mean(axis=0), train_features.std(axis=0) + 1e-6
    standardised = (train_features - mean) / std
    rng = np.random.default_rng(seed)
    head = nn.Linear(standardised.shape[1], classes, init_scheme="xavier", rng=rng)
    head.weight.data *= np.float32(models.HEAD_GAIN)
    opt = optim.SGD([{"params": [head.weight], "weight_decay": weight_decay}, {"params": [head.bias]}],
                    lr=lr, momentum=0.9)
    objective = F.multiclass_hinge if loss == "svm" else F.softmax_cross_entropy
    for _ in range(epochs):
        order = rng.permutation(len(standardised))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            value = objective(head(Tensor(standardised[batch])), labels[batch])
            opt.zero_grad()
            value.backward()
            opt.step()
    # fold the standardisation into the layer: W (x - m) / s + b = (W / s) x + (b - W m / s)
    with no_grad():
        w = head.weight.data / std
        head.bias.data[...] = head.bias.data - w @ mean
        head.weight.data[...] = w
    return head


def _accuracy(head: nn.Linear, feats, labels) -> float:
    with no_grad():
        return float((head(Tensor(np.asarray(feats, np.float32))).numpy().argmax(axis=1) == labels).mean())


def top_feature_layer(model: nn.Sequential) -> int:
    """The layer whose output the classifier reads (dropout skipped: it is the identity then)."""
    index = len(model) - 2
    while index > 0 and isinstance(model[index], nn.Dropout):
        index -= 1
    return index


def early_feature_layer(model: nn.Sequential) -> int:
    """The end of the first stage (its pooling), or the top features without pooling."""
    for index, layer in enumerate(model):
        if isinstance(layer, (nn.MaxPool2, nn.AvgPool2)):
            return index
    return top_feature_layer(model)


def last_stage_start(model: nn.Sequential) -> int:
    pools = [i for i, layer in enumerate(model) if isinstance(layer, (nn.MaxPool2, nn.AvgPool2))]
    return pools[-2] + 1 if len(pools) >= 2 else 0


# ------------------------------------------------------------------------------- presets

@dataclasses.dataclass(frozen=True)
class Preset:
    data: str            # small | large (the new data set)
    task: str            # similar | different (to the one the network learnt)
    method: str          # probe | finetune
    description: str
    probe: str = "softmax"
    epochs: int = 30
    lr_factor: float = 0.1   # pre-trained layers learn at this fraction of the head's rate


PRESETS = {
    "similar-small": Preset("small", "similar", "probe", "small data, similar task: a linear (softmax) classifier "
                            "on the top features", probe="softmax", epochs=30),
    "similar-large": Preset("large", "similar", "finetune", "large data, similar task: fine-tune the last stage and "
                            "a new head at a small learning rate, earlier layers frozen", epochs=5),
    "different-small": Preset("small", "different", "probe", "small data, different task: a linear SVM on early "
                              "features (the end of the first stage)", probe="svm", epochs=30),
    "different-large": Preset("large", "different", "finetune", "large data, different task: fine-tune every layer "
                              "and a new head at a small learning rate", epochs=5),
}
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclasses.dataclass
class FinetuneResult:
    preset: str
    what: str
    val_accuracy: float | None
    test_accuracy: float
    test_images: int
    run_dir: Path
    checkpoint: Path

    def summary(self) -> str:
        val = f"validation accuracy {self.val_accuracy:.4f}; " if self.val_accuracy is not None else ""
        return (f"{self.preset}: {self.what}\n{val}test accuracy {self.test_accuracy:.4f} on {self.test_images} test "
                f"images, measured once; checkpoint {self.checkpoint} (pycnn evaluate takes it)")


def run_preset(checkpoint, preset: str, run_dir="runs/finetune", dataset=None, classes=None, limit=None, layer=None,
               probe=None, epochs=None, lr=None, val_size="auto", seed: int = 0, progress: bool = True,
               overwrite: bool = False) -> FinetuneResult:
    """Transfer the network of ``checkpoint`` to a new task (``dataset`` and ``classes``; the
    checkpoint's by default) with one of ``PRESETS``; the new task's validation split chooses
    (the probe's weight decay, the best fine-tuning epoch), its test set is used once.
    ``layer``: the probe's layer, or the first trained layer of a fine-tuning preset.  A
    RUN_DIR that holds a run is refused (RunDirError) unless ``overwrite`` (its checkpoints
    are deleted)."""
    run_dir = Path(run_dir)
    source = Path(checkpoint).resolve().parent
    if run_dir.resolve() in (source, source.parent):  # RUN/checkpoints/epoch_N.npz: RUN is the source run
        raise ConfigError(f"run_dir: {run_dir} holds the checkpoint being fine-tuned; writing there would replace the "
                          "source run: choose another --run-dir")
    check_run_dir(run_dir, overwrite=overwrite, command="finetune")
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    chosen = PRESETS[preset]
    if probe is not None and chosen.method != "probe":
        raise ConfigError(f"--probe applies to the probe presets (similar-small, different-small), not {preset}")
    arrays, meta = read_checkpoint(checkpoint)
    if isinstance(meta.get("model"), dict) and "probe" in meta["model"]:
        raise ConfigError(f"{checkpoint} is a linear probe (the first layers and a linear head): fine-tune from the "
                          "checkpoint of the network it probes")
    model = load_model(checkpoint)
    try:
        preprocessor = preprocess.from_state_dict(
            {k[len("preprocess/"):]: v for k, v in arrays.items() if k.startswith("preprocess/")})
        base = Config.from_dict(meta["config"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint} is not a usable pycnn checkpoint ({exc})") from None
    check_device(base.device)
    dataset = dataset or base.dataset
    if classes is None:  # the checkpoint's, on its own dataset
        classes = base.classes if dataset == base.dataset else ()
    config = Config.from_dict(base.to_dict(), dataset=dataset, classes=tuple(classes),
                              limit=limit or 0, val_size=val_size, folds=0, fold=0, seed=seed, early_stop=0,
                              epochs=chosen.epochs if epochs is None else epochs,
                              lr=(0.1 if chosen.method == "probe" else base.lr) if lr is None else lr)
    splits = split_data(config)
    spec = dict(meta["model"])
    if (splits.train_x.shape[1], splits.train_x.shape[2]) != (spec["in_channels"], spec["image_size"]):
        raise ConfigError(f"dataset: the checkpoint's model takes {spec['in_channels']}x{spec['image_size']}x"
                          f"{spec['image_size']} images; {config.dataset} has {splits.train_x.shape[1]}x"
                          f"{splits.train_x.shape[2]}x{splits.train_x.shape[3]}")
    limit_layer = len(model) - 2
    if layer is not None and not 0 <= layer <= limit_layer:
        raise ConfigError(f"layer must be in [0, {limit_layer}] for this model ({len(model)} layers), got {layer}")
    if chosen.method == "probe" and not len(splits.val_y):
        raise ConfigError("val_size: a probe chooses its weight decay on a validation set; it must not be 0")
    prepare_run_dir(run_dir, resume=False)
    if overwrite:
        for old in (run_dir / "checkpoints").glob("*.npz"):
            old.unlink()
    (run_dir / "config.json").write_text(json.dumps({**config.to_dict(), "finetune": {
        "checkpoint": str(checkpoint), "preset": preset, "layer": layer, "probe": probe}}, indent=2))
    pycnn.manual_seed(seed)
    spec["classes"] = splits.classes
    if chosen.method == "probe":
        return _run_probe(model, preprocessor, splits, config, spec, chosen, preset, layer, probe or chosen.probe,
                          run_dir, progress)

    start = layer if layer is not None else (last_stage_start(model) if chosen.task == "similar" else 0)
    replace_head(model, splits.classes, rng=np.random.default_rng(seed))
    freeze(model, up_to=start)
    head = model[len(model) - 1]
    groups = []
    for layer_module in model:
        params = [p for p in layer_module.parameters() if p.requires_grad]
        rate = config.lr if layer_module is head else config.lr * chosen.lr_factor
        for p in params:
            groups.append({"params": [p], "lr": rate, "weight_decay": config.weight_decay if p.ndim > 1 else 0.0})
    optimizer = optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    schedule = schedules.CosineLR(optimizer, config.epochs)
    train_loader = data.DataLoader((splits.train_x, splits.train_y), config.batch_size, shuffle=True, seed=seed,
                                   transform=BatchPipeline(augmentation(config, splits.train_x), preprocessor),
                                   prefetch=config.prefetch)
    val_loader = data.DataLoader((splits.val_x, splits.val_y), 256, shuffle=False, transform=preprocessor,
                                 prefetch=0) if len(splits.val_y) else None
    trainer = Trainer(model, optimizer, train_loader, val_loader, schedule=schedule, loss=config.loss,
                      checkpoint_dir=run_dir / "checkpoints", progress=progress, device=config.device,
                      meta={"model": spec, "config": config.to_dict(), "finetune": {"preset": preset, "frozen": start}},
                      attachments={f"preprocess/{k}": v for k, v in preprocessor.state_dict().items()})
    history = trainer.fit(config.epochs)
    if history["stopped"] or history["interrupted"]:
        raise FinetuneStopped(history["stopped"] or "interrupted")
    history["test"] = score_on_test(trainer, config, splits, preprocessor)
    write_history(history, run_dir)
    figures.plot_history(history, run_dir)
    report.write_report(history, config.to_dict(), run_dir, classes=splits.classes)
    best = history["best_epoch"]
    trained = f"layers {start}..{len(model) - 2} at lr {config.lr * chosen.lr_factor:g}, " if start < len(model) - 1 \
        else ""
    what = (f"layers 0..{start - 1} frozen (running statistics included), " if start else "no layer frozen, ") + \
        f"{trained}a new head of {splits.classes} classes at lr {config.lr:g}; best epoch {best} of {config.epochs}"
    return FinetuneResult(preset, what, history["val_accuracy"][best - 1] if history["val_accuracy"] else None,
                          history["test"]["accuracy"], history["test"]["images"], run_dir,
                          run_dir / "checkpoints" / f"epoch_{best:03d}.npz")


def _run_probe(model, preprocessor, splits, config, spec, chosen, preset, layer, loss, run_dir, progress):
    index = layer if layer is not None else (top_feature_layer(model) if chosen.task == "similar"
                                             else early_feature_layer(model))
    feats = {name: features(model, index, preprocessor(x)) for name, x in
             (("train", splits.train_x), ("val", splits.val_x), ("test", splits.test_x))}
    scores = {}
    for decay in PROBE_WEIGHT_DECAYS:  # the regularisation strength, chosen on the validation set
        head = linear_probe(feats["train"], splits.train_y, splits.classes, epochs=config.epochs, lr=config.lr,
                            weight_decay=decay, seed=config.seed, loss=loss)
        scores[decay] = (_accuracy(head, feats["val"], splits.val_y), head)
        if progress:
            print(f"  {loss} probe on layer {index}, weight decay {decay:g}: validation accuracy "
                  f"{scores[decay][0]:.4f}")
    decay = max(PROBE_WEIGHT_DECAYS, key=lambda d: scores[d][0])
    val_accuracy, head = scores[decay]
    if not all(np.isfinite(p.numpy()).all() for p in head.parameters()):
        raise FinetuneStopped(f"the linear probe diverged (its weights are not finite) at lr {config.lr:g}: "
                              "try a smaller --lr")
    test_accuracy = _accuracy(head, feats["test"], splits.test_y)
    spec["probe"] = {"layer": index, "features": int(feats["train"].shape[1])}
    probe_model = models.build(spec)
    for i in range(index + 1):
        probe_model[i].load_state_dict(model[i].state_dict())
    probe_model[len(probe_model) - 1].load_state_dict(head.state_dict())
    trainer = Trainer(probe_model, optim.SGD(head.parameters(), lr=config.lr), None, progress=False,
                      meta={"model": spec, "config": config.to_dict(),
                            "finetune": {"preset": preset, "layer": index, "probe": loss, "weight_decay": decay}},
                      attachments={f"preprocess/{k}": v for k, v in preprocessor.state_dict().items()})
    trainer.history["val_accuracy"] = [val_accuracy]
    trainer.history["test"] = {"accuracy": test_accuracy, "images": int(len(splits.test_y))}
    path = trainer.save_checkpoint(run_dir / "checkpoints" / "probe.npz")
    (run_dir / "history.json").write_text(json.dumps({
        "preset": preset, "layer": index, "probe": loss, "features": spec["probe"]["features"],
        "val_accuracy_by_weight_decay": {f"{d:g}": s[0] for d, s in scores.items()}, "weight_decay": decay,
        "val_accuracy": val_accuracy, "test": trainer.history["test"]}, indent=1))
    name = type(model[index]).__name__
    what = (f"{'SVM (multiclass hinge)' if loss == 'svm' else 'softmax'} probe on layer {index} ({name}, "
            f"{spec['probe']['features']} features), weight decay {decay:g} chosen on {len(splits.val_y)} validation "
            "images")
    return FinetuneResult(preset, what, val_accuracy, test_accuracy, int(len(splits.test_y)), run_dir, path)
