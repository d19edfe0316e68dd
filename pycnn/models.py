"""Model builders.  A model is described by a small JSON-able dict (``spec``) so that a
checkpoint can rebuild it: ``build(spec)``."""
from __future__ import annotations

import numpy as np

from pycnn import nn

ACTIVATIONS = {
    "relu": lambda c: nn.ReLU(),
    "leaky_relu": lambda c: nn.LeakyReLU(0.01),
    "prelu": lambda c: nn.PReLU(c),
    "rrelu": lambda c: nn.RReLU(),
    "elu": lambda c: nn.ELU(),
    "tanh": lambda c: nn.Tanh(),
}


def vgg(in_channels: int, image_size: int, classes: int, widths=(32, 64, 128), convs_per_stage: int = 2,
        activation: str = "relu", batchnorm: bool = True, dropout: float = 0.0, hidden: int = 0,
        init_scheme: str = "he", rng=None) -> nn.Sequential:
    """A VGG-style network: per stage ``convs_per_stage`` x (conv3x3 [+ BN] + activation),
    then 2x2 max pooling; then [dropout + linear(hidden) + activation] + dropout + linear.

    (N, in_channels, S, S) -> (N, classes), S divisible by 2**len(widths)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if image_size % (2 ** len(widths)):
        raise ValueError(f"image_size {image_size} must be divisible by 2**{len(widths)} (one pooling per stage)")
    if convs_per_stage < 1:
        raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
    rng = rng if rng is not None else np.random.default_rng(0)
    layers, channels = [], in_channels
    for width in widths:
        for _ in range(convs_per_stage):
            layers.append(nn.Conv3x3(channels, width, bias=not batchnorm, init_scheme=init_scheme, rng=rng))
            if batchnorm:
                layers.append(nn.BatchNorm(width))
            layers.append(ACTIVATIONS[activation](width))
            channels = width
        layers.append(nn.MaxPool2())
    side = image_size // 2 ** len(widths)
    layers.append(nn.Flatten())
    features = channels * side * side
    if hidden:
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(features, hidden, init_scheme=init_scheme, rng=rng), ACTIVATIONS[activation](hidden)]
        features = hidden
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(features, classes, init_scheme="xavier", rng=rng))
    return nn.Sequential(*layers)


def build(spec: dict, seed: int = 0) -> nn.Sequential:
    """The model of a spec {"name": "vgg", ...keyword arguments of vgg}."""
    spec = dict(spec)
    name = spec.pop("name", "vgg")
    if name != "vgg":
        raise ValueError(f"model name must be 'vgg', got {name!r}")
    if "widths" in spec:
        spec["widths"] = tuple(spec["widths"])
    return vgg(rng=np.random.default_rng(seed), **spec)
