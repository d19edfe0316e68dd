"""Weight initialisation (CS231n lecture 6; Glorot & Bengio 2010; He et al. 2015).

Fans of a weight of shape (out, in, *kernel): fan_in = in * prod(kernel),
fan_out = out * prod(kernel).

| scheme            | distribution                          | for                         |
|-------------------|---------------------------------------|-----------------------------|
| zeros             | all 0 (every unit stays identical:    | biases; never weights       |
|                   | symmetry is never broken)             |                             |
| small             | N(0, 0.01^2)                          | shallow nets (vanishes deep)|
| xavier            | N(0, 1 / fan_in)                      | tanh, sigmoid, linear       |
| glorot            | N(0, 2 / (fan_in + fan_out))          | tanh, sigmoid, linear       |
| he                | N(0, 2 / fan_in)                      | ReLU and its family         |
| *_uniform         | U(-a, a) with a = sqrt(3 * variance)  | same variance as the normal |
"""
from __future__ import annotations

import numpy as np

from pycnn import random as _random

SCHEMES = ("zeros", "small", "xavier", "glorot", "he", "xavier_uniform", "glorot_uniform", "he_uniform")


def fans(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"fans need a weight of at least 2 dimensions, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def variance(scheme: str, shape) -> float:
    if scheme not in SCHEMES:
        raise ValueError(f"init scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "zeros":
        return 0.0
    fan_in, fan_out = fans(shape)
    base = scheme.removesuffix("_uniform")
    if base == "small":
        return 0.01 ** 2
    if base == "xavier":
        return 1.0 / fan_in
    if base == "glorot":
        return 2.0 / (fan_in + fan_out)
    if base == "he":
        return 2.0 / fan_in
    raise ValueError(f"init scheme must be one of {SCHEMES}, got {scheme!r}")


def float_dtype(dtype) -> np.dtype:
    """dtype as a NumPy dtype, if it is one pycnn computes in (float32, float64)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in ("float32", "float64"):  # (dtype == None is float64's)
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def initialise(scheme: str, shape, dtype=np.float32, rng: np.random.Generator | None = None) -> np.ndarray:
    """A new weight array of ``shape`` drawn by ``scheme`` (see the table above)."""
    if scheme not in SCHEMES:
        raise ValueError(f"init scheme must be one of {SCHEMES}, got {scheme!r}")
    dtype = float_dtype(dtype)
    if scheme == "zeros" or 0 in tuple(int(s) for s in shape):  # an empty weight has no fan to scale by
        return np.zeros(shape, dtype)
    rng = _random.generator() if rng is None else rng
    std = np.sqrt(variance(scheme, shape))
    if scheme.endswith("_uniform"):
        bound = np.sqrt(3.0) * std
        return rng.uniform(-bound, bound, shape).astype(dtype)
    return (std * rng.standard_normal(shape)).astype(dtype)


def apply(model, scheme: str, rng: np.random.Generator | None = None) -> None:
    """Re-initialise the weight of every Conv3x3 and Linear layer of ``model`` (the layers that
    say ``initialised_by_scheme``) with ``scheme`` and zero their biases."""
    for _, module in model.named_modules():
        if getattr(module, "initialised_by_scheme", False):
            module.weight.data[...] = initialise(scheme, module.weight.shape, module.weight.dtype, rng)
            if module.bias is not None:
                module.bias.data[...] = 0
