"""Fine-tuning and transfer (CS231n lecture 6): start from a trained network, freeze the
early layers, give the rest smaller learning rates, replace the head, or train a linear
classifier on the features of any layer.

    model = finetune.load_model("runs/a/checkpoints/epoch_010.npz")
    finetune.replace_head(model, classes=5)
    finetune.freeze(model, up_to=4)                      # layers 0..3 keep their weights
    groups = finetune.layerwise_lr_groups(model, lr=0.01, decay=0.5)
    opt = optim.SGD(groups, lr=0.01, momentum=0.9)
"""
from __future__ import annotations

import numpy as np

from pycnn import models, nn, optim
from pycnn.autograd import Tensor, no_grad
from pycnn.trainer import read_checkpoint
import pycnn.functional as F


def load_model(checkpoint) -> nn.Sequential:
    """The model stored in a checkpoint written by ``pycnn train``, with its weights."""
    arrays, meta = read_checkpoint(checkpoint)
    model = models.build(meta["model"])
    model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    return model


def _check_sequential(model) -> None:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")


def freeze(model: nn.Sequential, up_to: int) -> None:
    """Stop learning in layers [0, up_to): their parameters no longer require gradients.
    (Batch norm layers among them still normalise with batch statistics in training mode.)"""
    _check_sequential(model)
    if not 0 <= up_to <= len(model):
        raise ValueError(f"up_to must be in [0, {len(model)}], got {up_to}")
    for index, layer in enumerate(model):
        for p in layer.parameters():
            p.requires_grad = index >= up_to


def layerwise_lr_groups(model: nn.Sequential, lr: float, decay: float = 0.5) -> list[dict]:
    """Parameter groups whose learning rate shrinks by ``decay`` per parametrised layer from
    the head backwards: the last layer gets ``lr``, the one before ``lr * decay``, ...
    Frozen parameters are left out."""
    _check_sequential(model)
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    layers = [layer for layer in model if any(p.requires_grad for p in layer.parameters())]
    groups = []
    for depth, layer in enumerate(reversed(layers)):
        params = [p for p in layer.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": lr * decay ** depth})
    return groups[::-1]


def replace_head(model: nn.Sequential, classes: int, rng=None) -> nn.Linear:
    """Swap the last Linear layer for a new one with ``classes`` outputs (Xavier-initialised)."""
    _check_sequential(model)
    for index in range(len(model) - 1, -1, -1):
        if isinstance(model[index], nn.Linear):
            old = model[index]
            head = nn.Linear(old.in_features, classes, init_scheme="xavier", rng=rng)
            setattr(model, str(index), head)
            return head
    raise ValueError("model has no Linear layer to replace")


def features(model: nn.Sequential, layer: int, images, batch_size: int = 256) -> np.ndarray:
    """The flattened output of layer ``layer`` (inclusive) for float32 images (N, C, H, W),
    computed in evaluation mode: (N, features)."""
    _check_sequential(model)
    if not 0 <= layer < len(model):
        raise ValueError(f"layer must be in [0, {len(model) - 1}], got {layer}")
    model.eval()
    out = []
    with no_grad():
        for start in range(0, len(images), batch_size):
            x = Tensor(images[start:start + batch_size])
            for block in list(model)[:layer + 1]:
                x = block(x)
            out.append(x.numpy().reshape(len(x.data), -1))
    model.train()
    return np.concatenate(out)


def linear_probe(train_features, train_labels, classes: int, epochs: int = 30, lr: float = 0.1,
                 weight_decay: float = 1e-4, batch_size: int = 128, seed: int = 0) -> nn.Linear:
    """A softmax classifier trained on fixed features (standardised inside: the returned
    layer's weights already include that scaling)."""
    train_features = np.asarray(train_features, np.float32)
    mean, std = train_features.mean(axis=0), train_features.std(axis=0) + 1e-6
    standardised = (train_features - mean) / std
    rng = np.random.default_rng(seed)
    head = nn.Linear(standardised.shape[1], classes, init_scheme="xavier", rng=rng)
    opt = optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(epochs):
        order = rng.permutation(len(standardised))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.softmax_cross_entropy(head(Tensor(standardised[batch])), np.asarray(train_labels)[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    # fold the standardisation into the layer: W (x - m) / s + b = (W / s) x + (b - W m / s)
    with no_grad():
        w = head.weight.data / std
        head.bias.data[...] = head.bias.data - w @ mean
        head.weight.data[...] = w
    return head
