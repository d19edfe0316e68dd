"""Training runs: one ``Config`` (flags of ``pycnn train``, or keys of a TOML file) describes
data, pre-processing, augmentation, model, optimiser, schedule and loss; ``run`` trains it
and writes a run directory:

    RUN_DIR/config.json            the config
    RUN_DIR/history.json, .csv     per-batch loss, per-epoch loss / accuracy / lr / speed
    RUN_DIR/checkpoints/epoch_NNN.npz   model, optimiser, schedule, RNG, pre-processing
    RUN_DIR/loss.png, accuracy.png the figures

``run(config, resume=True)`` continues from the newest checkpoint of RUN_DIR and gives the
same result as an uninterrupted run.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path


import pycnn
from pycnn import augment, data, datasets, models, optim, preprocess, schedules
from pycnn.trainer import Trainer, read_checkpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclasses.dataclass
class Config:
    # data
    dataset: str = "digits"            # digits (embedded, offline) | cifar10 (../shared/data/cifar10)
    limit: int = 0                     # use only the first N training images (0: all)
    balance: str = "none"              # none | upsample | downsample (class-balanced sampling)
    preprocess: str = "standardise"    # standardise | mean_image | channel_mean | minmax | zca
    # augmentation
    flip: bool = False
    crop_padding: int = 0              # pad-and-crop by this many pixels (0: off)
    fancy_pca: float = 0.0             # std of the AlexNet colour alphas (0: off, 0.1 typical)
    colour_jitter: bool = False
    rotation: float = 0.0              # maximum rotation in degrees (0: off)
    # model
    widths: tuple = (16, 32)
    convs_per_stage: int = 1
    activation: str = "relu"
    batchnorm: bool = True
    dropout: float = 0.25
    hidden: int = 0
    init: str = "he"
    # optimisation
    optimizer: str = "sgd"             # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    l1: float = 0.0
    max_norm: float = 0.0              # 0: off
    schedule: str = "cosine"           # none | step | cosine | plateau
    step_size: int = 10
    gamma: float = 0.1
    plateau_factor: float = 2.0
    patience: int = 2
    warmup_steps: int = 0
    loss: str = "cross_entropy"        # cross_entropy | hinge
    label_smoothing: float = 0.0
    # run
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    prefetch: int = 2
    device: str = "cpu"                # cpu (NumPy arrays) | cuda (CuPy arrays on an NVIDIA GPU)

    CHOICES = {"dataset": ("digits", "cifar10"), "balance": ("none", "upsample", "downsample"),
               "preprocess": ("standardise", "mean_image", "channel_mean", "minmax", "zca"),
               "activation": tuple(models.ACTIVATIONS), "optimizer": ("sgd", "adam"),
               "schedule": ("none", "step", "cosine", "plateau"), "loss": ("cross_entropy", "hinge"),
               "device": ("cpu", "cuda")}

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "convs_per_stage", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit", "crop_padding", "fancy_pca", "rotation", "l1", "max_norm", "weight_decay",
                     "warmup_steps", "seed", "prefetch", "hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.widths:
            raise ValueError("widths must list at least one stage")

    @classmethod
    def from_toml(cls, path, **overrides) -> "Config":
        with open(path, "rb") as f:
            values = tomllib.load(f)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys in {path}: {unknown}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


# ------------------------------------------------------------------------------- pieces

def load_data(config: Config):
    """(train_images, train_labels, test_images, test_labels), images uint8 NCHW."""
    if config.dataset == "digits":
        images, labels = datasets.digits()
        train_x, train_y, test_x, test_y = datasets.train_test_split(images, labels, 0.2, seed=0)
    else:
        train_x, train_y = datasets.cifar10_shared("train")
        test_x, test_y = datasets.cifar10_shared("test")
    if config.limit:
        train_x, train_y = train_x[:config.limit], train_y[:config.limit]
    return train_x, train_y, test_x, test_y


PREPROCESSORS = {
    "standardise": lambda: preprocess.Standardise(per="channel"),
    "mean_image": preprocess.SubtractMeanImage,
    "channel_mean": preprocess.SubtractChannelMean,
    "minmax": preprocess.MinMaxScale,
    "zca": preprocess.ZCAWhiten,
}


def augmentation(config: Config, train_images) -> augment.Compose | None:
    steps = []
    if config.flip:
        steps.append(augment.RandomFlip())
    if config.crop_padding:
        steps.append(augment.RandomCrop(padding=config.crop_padding))
    if config.rotation:
        steps.append(augment.RandomRotation(degrees=config.rotation))
    # photometric steps see [0, 255] pixels whether an earlier step left uint8 or float
    if config.colour_jitter:
        steps.append(augment.ColourJitter(scale=255.0))
    if config.fancy_pca:
        steps.append(augment.FancyPCA(std=config.fancy_pca, scale=255.0).fit(train_images))
    return augment.Compose(steps) if steps else None


class BatchPipeline:
    """augmentation (training only), then the fitted pre-processing: uint8 batch -> float32."""

    def __init__(self, augmentation, preprocessor):
        self.augmentation, self.preprocessor = augmentation, preprocessor

    def __call__(self, images, rng):
        if self.augmentation is not None:
            images = self.augmentation(images, rng)
        return self.preprocessor(images)

    def __repr__(self):
        return f"BatchPipeline({self.augmentation!r}, {self.preprocessor!r})"


def build(config: Config, train_x, train_y, test_x, test_y):
    """(model, optimiser, schedule, train loader, test loader, fitted pre-processor)."""
    pycnn.manual_seed(config.seed)
    preprocessor = PREPROCESSORS[config.preprocess]().fit(train_x)
    pipeline = BatchPipeline(augmentation(config, train_x), preprocessor)
    sampler = data.BalancedSampler(train_y, mode=config.balance, seed=config.seed) \
        if config.balance != "none" else None
    train_loader = data.DataLoader((train_x, train_y), config.batch_size, shuffle=True, seed=config.seed,
                                   transform=pipeline, sampler=sampler, prefetch=config.prefetch)
    test_loader = data.DataLoader((test_x, test_y), 256, shuffle=False, transform=preprocessor, prefetch=0)
    classes = int(max(train_y.max(), test_y.max()) + 1)
    model = models.build(model_spec(config, train_x.shape[1], train_x.shape[2], classes), seed=config.seed)
    groups = optim.param_groups(model, weight_decay=config.weight_decay, l1=config.l1,
                                max_norm=config.max_norm or None)
    if config.optimizer == "sgd":
        optimiser = optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                              nesterov=config.nesterov and config.momentum > 0)
    else:
        optimiser = optim.Adam(groups, lr=config.lr)
    schedule = {
        "none": lambda: schedules.ConstantLR(optimiser, warmup_steps=config.warmup_steps),
        "step": lambda: schedules.StepLR(optimiser, config.step_size, config.gamma, warmup_steps=config.warmup_steps),
        "cosine": lambda: schedules.CosineLR(optimiser, config.epochs, warmup_steps=config.warmup_steps),
        "plateau": lambda: schedules.ReduceOnPlateau(optimiser, factor=config.plateau_factor,
                                                     patience=config.patience, warmup_steps=config.warmup_steps),
    }[config.schedule]()
    return model, optimiser, schedule, train_loader, test_loader, preprocessor


def model_spec(config: Config, in_channels: int, image_size: int, classes: int) -> dict:
    return {"name": "vgg", "in_channels": in_channels, "image_size": image_size, "classes": classes,
            "widths": list(config.widths), "convs_per_stage": config.convs_per_stage,
            "activation": config.activation, "batchnorm": config.batchnorm, "dropout": config.dropout,
            "hidden": config.hidden, "init_scheme": config.init}


# --------------------------------------------------------------------------------- runs

def run(config: Config, run_dir, resume: bool = False, progress: bool = True) -> dict:
    """Train ``config``, writing RUN_DIR (see the module docstring); returns the history."""
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    train_x, train_y, test_x, test_y = load_data(config)
    model, optimiser, schedule, train_loader, test_loader, preprocessor = build(config, train_x, train_y,
                                                                               test_x, test_y)
    spec = model_spec(config, train_x.shape[1], train_x.shape[2], int(max(train_y.max(), test_y.max()) + 1))
    trainer = Trainer(model, optimiser, train_loader, test_loader, schedule=schedule, loss=config.loss,
                      label_smoothing=config.label_smoothing, checkpoint_dir=checkpoint_dir, progress=progress,
                      device=config.device,
                      meta={"model": spec, "config": config.to_dict()},
                      attachments={f"preprocess/{k}": v for k, v in preprocessor.state_dict().items()})
    latest = latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        trainer.load_checkpoint(latest)
        if progress:
            print(f"resumed from {latest} (epoch {trainer.epoch})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if progress:
        print(f"pycnn {pycnn.__version__}: {config.dataset}, {len(train_y)} training and {len(test_y)} test "
              f"images; validation on the test split\n{model}")
    history = trainer.fit(config.epochs)
    write_history(history, run_dir)
    from pycnn import figures
    figures.plot_history(history, run_dir)
    return history


def latest_checkpoint(run_dir) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("epoch_*.npz"))
    return found[-1] if found else None


def write_history(history: dict, run_dir: Path) -> None:
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    with open(run_dir / "history.csv", "w", newline="") as f:
        columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                   "images_per_second"]
        writer = csv.writer(f)
        writer.writerow(columns)
        for e in range(len(history["train_loss"])):
            writer.writerow([e + 1] + [history[c][e] if e < len(history[c]) else "" for c in columns[1:]])


def evaluate_checkpoint(path, dataset: str = "digits", split: str = "test") -> tuple[float, float]:
    """(loss, accuracy) of a checkpoint on a dataset split, with its own pre-processing."""
    arrays, meta = read_checkpoint(path)
    model = models.build(meta["model"])
    model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    preprocessor = preprocess.from_state_dict(
        {k[len("preprocess/"):]: v for k, v in arrays.items() if k.startswith("preprocess/")})
    config = Config(**{**meta["config"], "dataset": dataset})
    train_x, train_y, test_x, test_y = load_data(config)
    images, labels = (test_x, test_y) if split == "test" else (train_x, train_y)
    loader = data.DataLoader((images, labels), 256, shuffle=False, transform=preprocessor, prefetch=0)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=1.0), loader, progress=False,
                      loss=meta["config"]["loss"])
    return trainer.evaluate(loader)

