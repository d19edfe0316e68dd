"""The settings of a training run: one ``Config`` whose fields are the flags of ``pycnn train``
and the keys of its TOML files.

Every value is checked when the config is made, with a message that names the setting and
what it expects (``ConfigError``, a ``ValueError``): integers reject fractions (``epochs =
2.5``), numbers reject strings (``lr = "fast"``), choices list what is allowed.  Settings that
depend on the data (crop padding and the number of pooling stages against the image size,
the validation size against the training set) are checked by ``check_against_data`` once the
data is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import sys

from pycnn import models

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting has a wrong type or value; the message names the setting."""


# warmup_steps "auto" warms the rate up over the first epoch, at most this many steps: without a
# warm-up the default rate (0.05) diverged on CIFAR-10 within its first epoch
AUTO_WARMUP_MAX_STEPS = 200
# share of the training images held out for validation when val_size is "auto"
DEFAULT_VAL_FRACTION = {"digits": 0.2, "cifar10": 0.1}   # digits: 287 of 1,437; CIFAR-10: 5,000 of 50,000


@dataclasses.dataclass
class Config:
    # data
    dataset: str = "digits"
    classes: tuple = ()
    limit: int = 0
    val_size: object = "auto"
    folds: int = 0
    fold: int = 0
    balance: str = "none"
    preprocess: str = "standardise"
    # augmentation
    flip: bool = False
    crop_padding: int = 0
    fancy_pca: float = 0.0
    colour_jitter: bool = False
    rotation: float = 0.0
    # model
    widths: tuple = (16, 32)
    convs_per_stage: int = 1
    activation: str = "relu"
    batchnorm: bool = True
    dropout: float = 0.25
    hidden: int = 0
    init: str = "he"
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    l1: float = 0.0
    max_norm: float = 0.0
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    plateau_factor: float = 2.0
    patience: int = 2
    warmup_steps: object = "auto"
    early_stop: int = 0
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    # run
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    prefetch: int = 2
    diagnostics_every: int = 50
    device: str = "cpu"
    cuda_graph: bool = False

    # what each setting means: the help of its flag (pycnn train --help) and of its TOML key
    HELP = {
        "dataset": "digits (embedded, offline) or cifar10 (../shared/data/cifar10, PYCNN_CIFAR10_DIR)",
        "classes": "train on these labels only, relabelled 0..k-1 in this order (empty: all)",
        "limit": "use N training images, a stratified draw from all of them (0: all)",
        "val_size": "images held out of training for validation: auto (digits 20%%, cifar10 5,000), N, "
                    "or 0 (none: no model selection)",
        "folds": "k-fold cross-validation with k >= 2 (0: off); the test set is left alone",
        "balance": "class-balanced sampling: none, upsample or downsample",
        "preprocess": "pre-processing fitted on the training images",
        "flip": "random horizontal flips",
        "crop_padding": "pad by N pixels and crop at random (0: off; less than half the image side)",
        "fancy_pca": "std of AlexNet's PCA colour alphas (0: off; 0.1 typical)",
        "colour_jitter": "random HSV jitter (RGB images only)",
        "rotation": "random rotation up to this many degrees (0: off)",
        "widths": "channels of each stage; every stage halves the image",
        "convs_per_stage": "conv3x3 (+ batch norm) + activation layers per stage",
        "activation": "the rectifier after each convolution",
        "batchnorm": "batch normalisation after each convolution",
        "dropout": "dropout probability before the classifier (0: off)",
        "hidden": "units of a hidden fully connected layer (0: none)",
        "init": "weight initialisation of the convolutions",
        "optimizer": "sgd (momentum, Nesterov) or adam",
        "lr": "learning rate (peak, after any warm-up)",
        "momentum": "SGD momentum",
        "nesterov": "Nesterov momentum",
        "weight_decay": "L2 regularisation of the weights (biases and batch norm are not decayed)",
        "l1": "L1 regularisation of the weights",
        "max_norm": "max-norm constraint on each unit's incoming weights (0: off)",
        "schedule": "learning-rate schedule; plateau cuts on the validation accuracy",
        "step_size": "epochs between cuts of the step schedule",
        "gamma": "factor of each cut of the step schedule",
        "plateau_factor": "divide the rate by this on a plateau",
        "patience": "epochs without improvement before a plateau cut",
        "warmup_steps": "linear warm-up of the learning rate over N steps: 0 off, auto the first epoch's steps "
                        f"(at most {AUTO_WARMUP_MAX_STEPS})",
        "early_stop": "stop after N epochs without a better validation accuracy (0: off)",
        "loss": "cross_entropy (softmax) or hinge (multiclass SVM)",
        "label_smoothing": "label smoothing of the cross-entropy",
        "epochs": "passes over the training images",
        "batch_size": "images per step",
        "seed": "seed of the initialisation, the order of the batches and the augmentation",
        "prefetch": "batches prepared ahead by the loader thread",
        "diagnostics_every": "per-layer readings (activations, dead units, gradients, updates) every N steps "
                             "(0: off)",
        "device": "cpu (NumPy arrays, C++ kernels) or cuda (CuPy arrays on an NVIDIA GPU)",
        "cuda_graph": "on device cuda, replay each training step as a captured CUDA graph (the same numbers, "
                      "less launch overhead)",
        "fold": "which fold validates this run (set by the k-fold driver)",
    }

    CHOICES = {"dataset": ("digits", "cifar10"), "balance": ("none", "upsample", "downsample"),
               "preprocess": ("standardise", "mean_image", "channel_mean", "minmax", "zca"),
               "activation": tuple(models.ACTIVATIONS), "optimizer": ("sgd", "adam"),
               "schedule": ("none", "step", "cosine", "plateau"), "loss": ("cross_entropy", "hinge"),
               "device": ("cpu", "cuda"), "init": ("he", "xavier", "glorot", "small", "he_uniform",
                                                   "xavier_uniform", "glorot_uniform")}
    # integer settings and their least value
    INTEGERS = {"limit": 0, "folds": 0, "fold": 0, "crop_padding": 0, "convs_per_stage": 1, "hidden": 0,
                "step_size": 1, "patience": 0, "early_stop": 0, "epochs": 1, "batch_size": 1,
                "seed": 0, "prefetch": 0, "diagnostics_every": 0}
    # number settings: (low, high, low inclusive, high inclusive)
    NUMBERS = {"fancy_pca": (0, math.inf, True, False), "rotation": (0, 180, True, True),
               "dropout": (0, 1, True, False), "lr": (0, math.inf, False, False),
               "momentum": (0, 1, True, False), "weight_decay": (0, math.inf, True, False),
               "l1": (0, math.inf, True, False), "max_norm": (0, math.inf, True, False),
               "gamma": (0, 1, False, True), "plateau_factor": (1, math.inf, False, False),
               "label_smoothing": (0, 1, True, False)}

    def __post_init__(self):
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if isinstance(field.default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be true or false, got {value!r}")
            elif name in self.INTEGERS:
                _check_int(name, value, self.INTEGERS[name])
            elif name in self.NUMBERS:
                setattr(self, name, _check_number(name, value, *self.NUMBERS[name]))
            elif name in self.CHOICES:
                if not isinstance(value, str) or value not in self.CHOICES[name]:
                    raise ConfigError(f"{name} must be one of {', '.join(self.CHOICES[name])}; got {value!r}")
        self.widths = _int_list("widths", self.widths, low=1, example="[32, 64, 128]")
        if not self.widths:
            raise ConfigError("widths must list at least one stage, such as [16, 32]")
        self.classes = _int_list("classes", self.classes, low=0, example="[0, 1, 2]")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must not repeat a label, got {list(self.classes)}")
        if len(self.classes) == 1:
            raise ConfigError(f"classes must name at least two labels (or none: all), got {list(self.classes)}")
        if self.val_size != "auto":
            _check_int("val_size", self.val_size, 0, extra=' or "auto"')
        if self.warmup_steps != "auto":
            _check_int("warmup_steps", self.warmup_steps, 0, extra=' or "auto"')
        if self.cuda_graph and self.device != "cuda":
            raise ConfigError(f"cuda_graph needs device cuda (CUDA graphs replay GPU work), got device {self.device}")
        if self.folds == 1:
            raise ConfigError("folds must be 0 (off) or at least 2, got 1")
        if self.folds and self.val_size not in ("auto", 0):
            raise ConfigError(f"val_size ({self.val_size}) and folds ({self.folds}) exclude each other: with k-fold "
                              "cross-validation every fold is the validation set once")
        if self.fold and not self.fold < self.folds:
            raise ConfigError(f"fold must be in [0, {max(self.folds - 1, 0)}] for folds = {self.folds}, "
                              f"got {self.fold}")
        if self.early_stop and self.val_size == 0 and not self.folds:
            raise ConfigError("early_stop needs a validation set: val_size must not be 0")

    @classmethod
    def from_toml(cls, path, **overrides) -> Config:
        """The config of a TOML file whose keys are the fields (flags override them).  A
        missing or unreadable file raises OSError; bad TOML, unknown keys or bad values
        raise ConfigError."""
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path} is not valid TOML: not UTF-8 text") from None
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown keys in {path}: {unknown} (the keys are the flags of pycnn train, "
                              "with _ for -)")
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> Config:
        """A config from a dict such as a run's config.json; keys of newer or older versions
        that this one does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in known})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        d["classes"] = list(self.classes)
        return d


def _check_int(name, value, low, extra=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {low}{extra}, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be an integer >= {low}{extra}, got {value}")


def _check_number(name, value, low, high, low_in, high_in) -> float:
    interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    expected = f"a number > {low:g}" if high == math.inf and not low_in else \
        f"a number >= {low:g}" if high == math.inf else f"a number in {interval}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (value >= low if low_in else value > low) and \
        (value <= high if high_in else value < high)
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return value


def _int_list(name, value, low, example) -> tuple:
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                                                for v in value):
        return tuple(int(v) for v in value)
    raise ConfigError(f"{name} must be a list of integers >= {low} such as {example}, got {value!r}")


def check_device(device: str) -> None:
    """Refuse, in about a second and before anything else runs, a device this machine cannot
    use: ConfigError naming the missing part (CuPy not installed, no GPU visible, a driver too
    old for the CUDA runtime of CuPy).  'cpu' always passes."""
    if device != "cuda":
        return
    install = "pip install 'pycnn[cuda]' (CUDA 13) or 'pycnn[cuda12]' (CUDA 12)"
    try:
        import cupy
    except ImportError:
        raise ConfigError(f"device 'cuda' needs CuPy, which is not installed: {install}") from None
    except Exception as exc:  # a broken CuPy install: its own words
        raise ConfigError(f"device 'cuda': CuPy does not import ({type(exc).__name__}: {exc})") from None
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:  # cupy's CUDARuntimeError, or a missing libcuda
        text = str(exc)
        if "NoDevice" in text or "no CUDA-capable device" in text:
            raise ConfigError("device 'cuda': CuPy is installed but no NVIDIA GPU is visible (nvidia-smi lists "
                              "none, or CUDA_VISIBLE_DEVICES hides them)") from None
        if "InsufficientDriver" in text or "driver version is insufficient" in text:
            raise ConfigError("device 'cuda': the NVIDIA driver is older than the CUDA runtime of this CuPy "
                              f"({text}); update the driver or install the CuPy of its CUDA version "
                              "('pycnn[cuda12]')") from None
        if "libcuda" in text or "driver" in text.lower():
            raise ConfigError(f"device 'cuda': no usable NVIDIA driver ({text})") from None
        raise ConfigError(f"device 'cuda': the GPU cannot be used ({type(exc).__name__}: {text})") from None
    if count < 1:
        raise ConfigError("device 'cuda': CuPy is installed but no NVIDIA GPU is visible")


def check_against_data(config: Config, channels: int, side: int, n_train: int) -> None:
    """The settings that depend on the images: raise ConfigError naming the setting."""
    stages = len(config.widths)
    if side % 2 ** stages:
        fits = max(s for s in range(0, 12) if side % 2 ** s == 0 and 2 ** s <= side)
        raise ConfigError(f"widths has {stages} stages, each halving the image: {side}x{side} images allow at "
                          f"most {fits}; got widths {list(config.widths)}")
    if config.crop_padding and 2 * config.crop_padding >= side:
        raise ConfigError(f"crop_padding must be less than half the image side ({side}x{side} images: at most "
                          f"{(side - 1) // 2}), got {config.crop_padding}")
    for name in ("colour_jitter", "fancy_pca"):  # both work on RGB colours
        if getattr(config, name) and channels != 3:
            raise ConfigError(f"{name} needs RGB images (3 channels); {config.dataset} has {channels}")
    least = 1 if config.val_size == 0 and not config.folds else 2
    if n_train < least:
        raise ConfigError(f"limit: {n_train} training image{'s are' if n_train != 1 else ' is'} too few (at least "
                          f"{least}: one to train on{' and one to validate on' if least == 2 else ''})")
    if config.val_size not in ("auto", 0) and not config.val_size <= n_train // 2:
        raise ConfigError(f"val_size must be at most half of the {n_train} training images (at most "
                          f"{n_train // 2}), got {config.val_size}")
    if config.folds and config.folds > n_train // 2:
        raise ConfigError(f"folds must be at most {n_train // 2} for {n_train} training images, got {config.folds}")
