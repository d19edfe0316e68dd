"""Model builders.  A model is described by a small JSON-able dict (``spec``) so that a
checkpoint can rebuild it: ``build(spec)``."""
from __future__ import annotations

import numpy as np

from pycnn import frontend, nn

# Xavier's N(0, 1/fan_in) assumes inputs of mean 0 and variance 1, but the classifier reads
# max-pooled rectified features: mean about 0.9 and second moment about 1.4 (1.85 after
# dropout's 1/(1-p) scaling) in the default digits model, so its scores started with a
# standard deviation of about 1.5 and the initial cross-entropy at 3.35 instead of ln 10 = 2.30.
# A tenth of Xavier's scale gives scores of std ~0.15 and an initial loss within 1% of ln(C).
HEAD_GAIN = 0.1

def _activation_layer(op):
    """channels -> a new layer of the activation op (with one slope per channel where it learns them)."""
    layer = getattr(nn, op.api.layer)
    return (lambda channels: layer(channels)) if op.api.weight is not None else (lambda channels: layer())


# the activations a model can use (pycnn train --activation), by op name
ACTIVATIONS = {op.name: _activation_layer(op) for op in frontend.api_ops() if op.api.activation}


def vgg(in_channels: int, image_size: int, classes: int, widths=(32, 64, 128), convs_per_stage: int = 2,
        activation: str = "relu", batchnorm: bool = True, dropout: float = 0.0, hidden: int = 0,
        init_scheme: str = "he", head_gain: float = HEAD_GAIN, rng=None) -> nn.Sequential:
    """A VGG-style network: per stage ``convs_per_stage`` x (conv3x3 [+ BN] + activation),
    then 2x2 max pooling; then [dropout + linear(hidden) + activation] + dropout + linear.

    The classifier (the last linear layer) starts at ``head_gain`` x Xavier's scale, so that
    the first scores are small and the initial loss is about ln(classes) (see ``HEAD_GAIN``).

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
    head = nn.Linear(features, classes, init_scheme="xavier", rng=rng)
    head.weight.data *= np.float32(head_gain)
    layers.append(head)
    return nn.Sequential(*layers)


def build(spec: dict, seed: int = 0) -> nn.Sequential:
    """The model of a spec {"name": "vgg", ...keyword arguments of vgg}.  With
    ``"probe": {"layer": L, "features": F}`` it is a linear probe: layers 0..L of that
    network, flattened, then one Linear(F, classes)."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    spec = dict(spec)
    name = spec.pop("name", "vgg")
    if name != "vgg":
        raise ValueError(f"model name must be 'vgg', got {name!r}")
    probe = spec.pop("probe", None)
    if "widths" in spec:
        spec["widths"] = tuple(spec["widths"])
    try:
        model = vgg(rng=np.random.default_rng(seed), **spec)
    except TypeError as exc:
        raise ValueError(f"bad model spec: {exc}") from None
    if probe is None:
        return model
    layer, features = int(probe["layer"]), int(probe["features"])
    if not 0 <= layer < len(model) - 1:
        raise ValueError(f"probe layer must be in [0, {len(model) - 2}], got {layer}")
    layers = list(model)[:layer + 1]
    if not isinstance(layers[-1], nn.Flatten):
        layers.append(nn.Flatten())
    layers.append(nn.Linear(features, spec["classes"], init_scheme="xavier", rng=np.random.default_rng(seed)))
    return nn.Sequential(*layers)
