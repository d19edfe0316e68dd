"""What a run is built from: the data and its three splits (training, validation held out of
it, test), pre-processing, augmentation, the batch pipeline, the model and the optimizer."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

import pycnn
from pycnn import data, models, optim, schedules
from pycnn.data import augment, datasets, preprocess
from pycnn.training.config import AUTO_WARMUP_MAX_STEPS, DEFAULT_VAL_FRACTION, Config, ConfigError, check_against_data

SPLIT_SEED = 0  # the validation split and the folds do not move with the training seed



def load_data(config: Config):
    """(train_images, train_labels, test_images, test_labels), images uint8 NCHW: the training
    pool (validation not yet held out; ``classes`` and ``limit`` applied: ``limit`` keeps N
    images drawn stratified from the whole pool, in their order) and the test set."""
    if config.dataset == "digits":
        images, labels = datasets.digits()
        train_x, train_y, test_x, test_y = datasets.train_test_split(images, labels, 0.2, seed=0)
    else:
        train_x, train_y = datasets.cifar10_shared("train")
        test_x, test_y = datasets.cifar10_shared("test")
    if config.classes:
        try:
            train_x, train_y = datasets.select_classes(train_x, train_y, config.classes)
            test_x, test_y = datasets.select_classes(test_x, test_y, config.classes)
        except ValueError as exc:
            raise ConfigError(f"classes: {exc} in {config.dataset}") from None
    if config.limit and config.limit < len(train_y):
        # a stratified draw spread over the whole pool (the same for every training seed), not the
        # first N: the digits are stored writer by writer, so the first N images come from a few
        # writers, and a validation set held out of them scores far above the test set
        _, chosen = datasets.stratified_holdout(train_y, config.limit, seed=SPLIT_SEED)
        train_x, train_y = train_x[chosen], train_y[chosen]
    return train_x, train_y, test_x, test_y


class Splits(NamedTuple):
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray      # empty when val_size = 0
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: int


def validation_size(config: Config, n_train: int) -> int:
    if config.val_size != "auto":
        return config.val_size
    return max(1, round(DEFAULT_VAL_FRACTION[config.dataset] * n_train))


def split_data(config: Config) -> Splits:
    """Training, validation (stratified, held out of the training pool) and test images."""
    pool_x, pool_y, test_x, test_y = load_data(config)
    check_against_data(config, pool_x.shape[1], pool_x.shape[2], len(pool_y))
    if config.folds:
        val = datasets.stratified_folds(pool_y, config.folds, seed=SPLIT_SEED)[config.fold]
        keep = np.setdiff1d(np.arange(len(pool_y)), val)
    elif validation_size(config, len(pool_y)):
        keep, val = datasets.stratified_holdout(pool_y, validation_size(config, len(pool_y)), seed=SPLIT_SEED)
    else:
        keep, val = np.arange(len(pool_y)), np.arange(0)
    classes = len(config.classes) or int(max(pool_y.max(), test_y.max()) + 1)
    return Splits(pool_x[keep], pool_y[keep], pool_x[val], pool_y[val], test_x, test_y, classes)


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


def build(config: Config, train_x, train_y, eval_x=None, eval_y=None, classes: int | None = None):
    """(model, optimizer, schedule, train loader, evaluation loader, fitted pre-processor); the
    evaluation loader (of ``eval_x``, the validation set in ``run``) is None without images.
    The pre-processing is fitted on ``train_x`` only."""
    pycnn.manual_seed(config.seed)
    preprocessor = PREPROCESSORS[config.preprocess]().fit(train_x)
    pipeline = BatchPipeline(augmentation(config, train_x), preprocessor)
    sampler = data.BalancedSampler(train_y, mode=config.balance, seed=config.seed) \
        if config.balance != "none" else None
    train_loader = data.DataLoader((train_x, train_y), config.batch_size, shuffle=True, seed=config.seed,
                                   transform=pipeline, sampler=sampler, prefetch=config.prefetch)
    eval_loader = None
    if eval_x is not None and len(eval_x):
        eval_loader = data.DataLoader((eval_x, eval_y), 256, shuffle=False, transform=preprocessor, prefetch=0)
    if classes is None:
        classes = len(config.classes) or int(max(train_y.max(), eval_y.max() if eval_y is not None and len(eval_y)
                                                  else 0) + 1)
    model = models.build(model_spec(config, train_x.shape[1], train_x.shape[2], classes), seed=config.seed)
    optimizer = make_optimizer(config, model)
    warmup = warmup_steps(config, len(train_loader))
    schedule = {
        "none": lambda: schedules.ConstantLR(optimizer, warmup_steps=warmup),
        "step": lambda: schedules.StepLR(optimizer, config.step_size, config.gamma, warmup_steps=warmup),
        "cosine": lambda: schedules.CosineLR(optimizer, config.epochs, warmup_steps=warmup),
        "plateau": lambda: schedules.ReduceOnPlateau(optimizer, factor=config.plateau_factor,
                                                     patience=config.patience, warmup_steps=warmup),
    }[config.schedule]()
    return model, optimizer, schedule, train_loader, eval_loader, preprocessor


def warmup_steps(config: Config, steps_per_epoch: int) -> int:
    """The warm-up's length in steps: ``config.warmup_steps``, or for "auto" the first epoch's
    steps, at most AUTO_WARMUP_MAX_STEPS."""
    if config.warmup_steps == "auto":
        return min(steps_per_epoch, AUTO_WARMUP_MAX_STEPS)
    return int(config.warmup_steps)


def make_optimizer(config: Config, model, regularise: bool = True):
    groups = optim.param_groups(model, weight_decay=config.weight_decay if regularise else 0.0,
                                l1=config.l1 if regularise else 0.0, max_norm=config.max_norm or None)
    if config.optimizer == "sgd":
        return optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov and config.momentum > 0)
    return optim.Adam(groups, lr=config.lr)




def model_spec(config: Config, in_channels: int, image_size: int, classes: int) -> dict:
    return {"name": "vgg", "in_channels": in_channels, "image_size": image_size, "classes": classes,
            "widths": list(config.widths), "convs_per_stage": config.convs_per_stage,
            "activation": config.activation, "batchnorm": config.batchnorm, "dropout": config.dropout,
            "hidden": config.hidden, "init_scheme": config.init}
