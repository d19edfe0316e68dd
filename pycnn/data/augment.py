"""Data augmentation on batches: arrays (N, C, H, W), uint8 or float, NumPy or CuPy.

Every transform is a callable ``t(x, rng=None)`` that returns a new batch on the device of
``x`` (the array module comes from ``pycnn.device.array_module``).  ``rng`` is an
``np.random.Generator`` or an integer seed; None draws from ``pycnn.random``'s global
generator (``pycnn.manual_seed``).  The random parameters (a few numbers per image) are
drawn on the host with NumPy, then moved to the array's device, so a seed gives the same
result on the CPU and on the GPU.

* geometric ops — ``RandomFlip``, ``RandomCrop``, ``RandomScaleCrop``, ``RandomRotation``
  — keep the dtype (uint8 in, uint8 out: bilinear results are rounded);
* photometric ops — ``ColourJitter``, ``FancyPCA`` — return float32 (float64 stays float64)
  on the scale of their input: uint8 input is read as RGB in [0, 255], float input as RGB in
  [0, ``scale``] (default 1.0).  Their maths runs in [0, 1].

``Compose([...])`` chains transforms (and plain callables such as the pre-processors of
``pycnn.data.preprocess``), handing one generator down the chain.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

import pycnn
from pycnn import random as _random
from pycnn.data.images import (
    bilinear_sample,
    check_batch,
    check_range,
    image_size,
    jitter_hsv,
    like_input,
    photometric_scale,
    rotate,
)
from pycnn.device import cpp_extension, to_host

__all__ = ["Transform", "Compose", "RandomFlip", "RandomCrop", "RandomScaleCrop", "RandomRotation",
           "ColourJitter", "ColorJitter", "FancyPCA", "as_generator"]


# ---------------------------------------------------------------------------------- helpers

def as_generator(rng) -> np.random.Generator:
    """``rng`` as a Generator: a Generator is used as is, an integer seeds a new one, None
    is pycnn's global generator (seeded by ``pycnn.manual_seed``, never by the clock)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return _random.generator()
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator, a non-negative integer seed or None, got {rng!r}")


def _rgb_moments_kernel():
    """``pycnn._C.rgb_moments`` (sums of x and x x^T over the pixels of a batch), or None
    where the C++ extension is not built (FancyPCA.fit then sums with NumPy)."""
    C = cpp_extension()
    return None if C is None else C.rgb_moments


def with_rng(transform):
    """``transform`` as a function of (x, rng): it gets the generator as its second
    positional argument (a Transform, ``f(x, rng)``, ``f(x, *args)``), as its ``rng``
    keyword (``f(x, scale=255.0, rng=None)``), or not at all (``f(x)``, and
    ``f(x, scale=255.0)``: a second argument with a default is a setting, not a generator)."""
    if isinstance(transform, Transform):
        return transform
    try:
        parameters = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):
        return lambda x, rng: transform(x)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 and (positional[1].name == "rng" or positional[1].default is inspect.Parameter.empty):
        return transform
    if any(p.name == "rng" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters):
        return lambda x, rng: transform(x, rng=rng)
    if len(positional) < 2 and any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return transform
    return lambda x, rng: transform(x)


# ------------------------------------------------------------------------------- transforms

class Transform:
    """Base class: ``t(x, rng=None)`` on a batch (N, C, H, W)."""

    def __call__(self, x, rng=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fields(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields()})"


class Compose(Transform):
    """Apply ``transforms`` in order, passing one generator down the chain.  Members may be
    transforms or any callable ``f(x)`` (a pre-processor, say)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if not callable(t):
                raise TypeError(f"transforms[{i}] must be callable, got {type(t).__name__}")
        self._calls = [with_rng(t) for t in self.transforms]

    def __call__(self, x, rng=None):
        rng = as_generator(rng)
        for call in self._calls:
            x = call(x, rng)
        return x

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])" if self.transforms else "Compose([])"


class RandomFlip(Transform):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x, rng=None):
        xp = check_batch(x)
        flip = as_generator(rng).random(len(x)) < self.p
        return xp.where(xp.asarray(flip)[:, None, None, None], x[..., ::-1], x)

    def _fields(self):
        return f"p={self.p}"


class RandomCrop(Transform):
    """Pad by ``padding`` pixels (``mode="zero"`` or ``"reflect"``), then cut a random window of
    ``size`` (default: the input's size) from each image: the CIFAR 'pad 4 and crop'."""

    def __init__(self, padding: int = 4, size=None, mode: str = "zero"):
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
        if mode not in ("zero", "reflect"):
            raise ValueError(f"mode must be 'zero' or 'reflect', got {mode!r}")
        self.padding, self.mode = int(padding), mode
        self.size = image_size("size", size)

    def __call__(self, x, rng=None):
        xp = check_batch(x)
        n, c, height, width = x.shape
        h, w = self.size or (height, width)
        p = self.padding
        if self.mode == "reflect" and p >= min(height, width):
            raise ValueError(f"padding must be smaller than the image ({height}x{width}) for reflect mode, got {p}")
        if h > height + 2 * p or w > width + 2 * p:
            raise ValueError(f"size {(h, w)} does not fit in the padded image {(height + 2 * p, width + 2 * p)}")
        padded = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="constant" if self.mode == "zero" else "reflect")
        rng = as_generator(rng)
        if n == 0:
            return xp.empty((0, c, h, w), x.dtype)
        top = rng.integers(0, height + 2 * p - h + 1, size=n)
        left = rng.integers(0, width + 2 * p - w + 1, size=n)
        wp = width + 2 * p
        # index (N, h*w) into the flattened padded image: (top + i) * wp + left + j
        index = ((top[:, None, None] + np.arange(h)[None, :, None]) * wp
                 + left[:, None, None] + np.arange(w)[None, None, :]).reshape(n, 1, h * w)
        out = xp.take_along_axis(padded.reshape(n, c, -1), xp.asarray(index), axis=2)
        return out.reshape(n, c, h, w)

    def _fields(self):
        size = "" if self.size is None else f", size={self.size}"
        return f"padding={self.padding}{size}, mode={self.mode!r}"


class RandomScaleCrop(Transform):
    """Scale augmentation (as VGG / ResNet): resize each image so that its shorter side is a
    random length in ``scale = (a, b)`` pixels (the aspect ratio is kept), then crop a random
    window of ``size`` (default: the input's size).  Resize and crop are one bilinear
    sampling pass (half-pixel centres, edges clamped, no antialiasing)."""

    def __init__(self, scale=(32, 40), size=None):
        self.scale = check_range("scale", scale, positive=True)
        self.size = image_size("size", size)

    def __call__(self, x, rng=None):
        xp = check_batch(x)
        n, _, height, width = x.shape
        h, w = self.size or (height, width)
        shorter = min(height, width)
        a, b = self.scale
        if a * height / shorter < h - 1e-9 or a * width / shorter < w - 1e-9:
            raise ValueError(f"scale {self.scale}: a shorter side of {a:g} px makes the {height}x{width} images "
                             f"smaller than the {h}x{w} crop")
        rng = as_generator(rng)
        factor = rng.uniform(a, b, size=n) / shorter                  # (N,) resize factor
        top = rng.random(n) * (height * factor - h)                   # (N,) crop offsets in
        left = rng.random(n) * (width * factor - w)                   # resized pixels
        # output pixel i comes from resized coordinate top + i, i.e. source (top + i + 0.5) / f - 0.5
        ys = (top[:, None] + np.arange(h)[None, :] + 0.5) / factor[:, None] - 0.5   # (N, h)
        xs = (left[:, None] + np.arange(w)[None, :] + 0.5) / factor[:, None] - 0.5  # (N, w)
        grid_y = np.broadcast_to(ys[:, :, None], (n, h, w))
        grid_x = np.broadcast_to(xs[:, None, :], (n, h, w))
        return like_input(bilinear_sample(x, xp.asarray(grid_y), xp.asarray(grid_x), "edge"), x)

    def _fields(self):
        size = "" if self.size is None else f", size={self.size}"
        return f"scale=({self.scale[0]:g}, {self.scale[1]:g}){size}"


class RandomRotation(Transform):
    """Rotate each image about its centre by a random angle in ``[-degrees, degrees]``
    (counter-clockwise as displayed) and scale it by a random factor in ``scale``; bilinear
    sampling, zeros where the source falls outside the image."""

    def __init__(self, degrees: float = 15.0, scale=(0.9, 1.1)):
        if not degrees >= 0:
            raise ValueError(f"degrees must be >= 0, got {degrees}")
        self.degrees = float(degrees)
        self.scale = check_range("scale", scale, positive=True)

    def draw(self, n: int, rng) -> dict:
        rng = as_generator(rng)
        return {"angle": rng.uniform(-self.degrees, self.degrees, size=n), "scale": rng.uniform(*self.scale, size=n)}

    def __call__(self, x, rng=None):
        check_batch(x)
        return rotate(x, **self.draw(len(x), rng))

    def _fields(self):
        return f"degrees={self.degrees:g}, scale=({self.scale[0]:g}, {self.scale[1]:g})"


# ------------------------------------------------------------------------------ colour

class ColourJitter(Transform):
    """Colour jitter of Wu et al., "Deep Image" (2015), as summarised in CS231n lecture 6:
    in HSV, raise S and V to a power in ``power`` (drawn log-uniformly, so brightening and
    darkening are equally likely), multiply them by a factor in ``factor``, add a value in
    ``shift``, and add a value in ``hue_shift`` to H (wrapping round).  S and V get
    independent draws; all pixels of one image share them.  Input RGB on [0, scale]
    (uint8: [0, 255], float: [0, 1] unless ``scale`` says otherwise); output float on the
    same scale."""

    def __init__(self, power=(0.25, 4.0), factor=(0.7, 1.4), shift=(-0.1, 0.1), hue_shift=(-0.1, 0.1), scale=None):
        self.power = check_range("power", power, positive=True)
        self.factor = check_range("factor", factor, low=0)
        self.shift = check_range("shift", shift)
        self.hue_shift = check_range("hue_shift", hue_shift)
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def draw(self, n: int, rng) -> dict:
        """The per-image parameters (each (n,)) for ``jitter_hsv``."""
        rng = as_generator(rng)
        log_low, log_high = math.log(self.power[0]), math.log(self.power[1])
        draws = {"hue_shift": rng.uniform(*self.hue_shift, size=n)}
        for channel in ("sat", "val"):
            draws[f"{channel}_power"] = np.exp(rng.uniform(log_low, log_high, size=n))
            draws[f"{channel}_factor"] = rng.uniform(*self.factor, size=n)
            draws[f"{channel}_shift"] = rng.uniform(*self.shift, size=n)
        return draws

    def __call__(self, x, rng=None):
        check_batch(x, channels=3)
        return jitter_hsv(x, **self.draw(len(x), rng), scale=self.scale)

    def _fields(self):
        def pair(p):
            return f"({p[0]:g}, {p[1]:g})"
        scale = "" if self.scale is None else f", scale={self.scale:g}"
        return (f"power={pair(self.power)}, factor={pair(self.factor)}, shift={pair(self.shift)}, "
                f"hue_shift={pair(self.hue_shift)}{scale}")


ColorJitter = ColourJitter


class FancyPCA(Transform):
    """AlexNet's colour augmentation (Krizhevsky et al. 2012, section 4.1): add
    ``eigvecs @ (alpha * eigvals)`` to every pixel of an image, where eigvals / eigvecs are
    those of the 3x3 covariance of the RGB values (in [0, 1]) of all training pixels and
    ``alpha ~ N(0, std)`` (3 numbers) is drawn once per image per call.

    ``fit(images_uint8, batch)`` streams the data set ``batch`` images at a time: the sums
    of the raw 0..255 values and of their products are exact integers in float64, so the
    covariance does not depend on ``batch`` and no float copy of the data set is made.
    Input RGB on [0, scale] (uint8: [0, 255], float: [0, 1] unless ``scale`` says otherwise);
    output float on the same scale.  ``__call__`` runs the registry op ``fancy_pca``
    (pycnn/ops/fancy_pca.py: C++ or CUDA kernels); ``fit`` sums with the C++ kernel
    ``rgb_moments`` where the extension is built, else with NumPy (the same exact sums)."""

    def __init__(self, std: float = 0.1, scale=None):
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std, self.scale = float(std), scale
        self.mean = self.cov = self.eigvals = self.eigvecs = None
        self.count = 0

    def fit(self, images, batch: int = 1024) -> FancyPCA:
        if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be RGB images (N, 3, H, W), got shape {getattr(images, 'shape', None)}")
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 (0..255), got dtype {images.dtype}")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        sums, products, count = np.zeros(3), np.zeros((3, 3)), 0
        moments = _rgb_moments_kernel()
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            chunk = to_host(chunk)
            if moments is not None:  # the C++ kernel: the same exact integer sums, one pass, no float copy
                count += moments(np.ascontiguousarray(chunk), sums, products)
                continue
            pixels = chunk.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)  # (3, pixels)
            sums += pixels.sum(axis=1)
            products += pixels @ pixels.T
            count += pixels.shape[1]
        if count < 2:
            raise ValueError("images must hold at least 2 pixels to estimate a covariance")
        if count * 255 * 255 >= 2 ** 53:  # pragma: no cover - 1.4e11 pixels
            raise ValueError("too many pixels for exact float64 sums")
        # cov = (n * sum(x x^T) - sum(x) sum(x)^T) / (n (n - 1)), exact in Python integers
        s = [int(v) for v in sums]
        cov = np.array([[(count * int(products[i, j]) - s[i] * s[j]) / (count * (count - 1)) for j in range(3)]
                        for i in range(3)]) / 255.0 ** 2
        self.mean, self.cov, self.count = sums / count / 255.0, cov, count
        self.eigvals, self.eigvecs = np.linalg.eigh(cov)  # ascending eigenvalues, eigenvectors in columns
        return self

    def alphas(self, n: int, rng) -> np.ndarray:
        """The per-image draws alpha ~ N(0, std), (n, 3)."""
        if self.eigvecs is None:
            raise RuntimeError("FancyPCA is not fitted: call fit(images_uint8) first")
        return as_generator(rng).normal(0.0, self.std, size=(n, 3))

    def offsets(self, n: int, rng) -> np.ndarray:
        """The per-image RGB offsets (n, 3) on the [0, 1] scale: eigvecs @ (alpha * eigvals)."""
        return (self.alphas(n, rng) * self.eigvals) @ self.eigvecs.T

    def __call__(self, x, rng=None):
        """x + scale * eigvecs @ (alpha[n] * eigvals) per image, through the registry op
        ``fancy_pca`` (C++ on NumPy arrays, CUDA on CuPy arrays); no autograd graph."""

        check_batch(x, channels=3)
        alphas = self.alphas(len(x), rng)
        if x.dtype not in (np.uint8, np.float32, np.float64):  # float16: work in float32
            x = x.astype(np.float32)
        with pycnn.no_grad():
            out = pycnn.apply_op("fancy_pca", x, eigvecs=self.eigvecs, eigvals=self.eigvals, alphas=alphas,
                                 scale=photometric_scale(x, self.scale))
        return out.data

    def state_dict(self) -> dict:
        if self.eigvecs is None:
            raise RuntimeError("FancyPCA is not fitted: call fit(images_uint8) first")
        state = {"type": np.array("FancyPCA"), "std": np.array(self.std), "mean": self.mean, "cov": self.cov,
                 "eigvals": self.eigvals, "eigvecs": self.eigvecs, "count": np.array(self.count)}
        if self.scale is not None:  # absent: the default scale of the input's dtype
            state["scale"] = np.array(float(self.scale))
        return state

    @classmethod
    def from_state_dict(cls, state) -> FancyPCA:
        if str(state["type"]) != "FancyPCA":
            raise ValueError(f"state is a {state['type']}, not a FancyPCA")
        t = cls(std=float(state["std"]), scale=float(state["scale"]) if "scale" in state else None)
        t.mean, t.cov = np.array(state["mean"]), np.array(state["cov"])
        t.eigvals, t.eigvecs, t.count = np.array(state["eigvals"]), np.array(state["eigvecs"]), int(state["count"])
        return t

    def _fields(self):
        fitted = f", fitted on {self.count} pixels, eigvals={np.array2string(self.eigvals, precision=4)}" \
            if self.eigvals is not None else ", not fitted"
        scale = "" if self.scale is None else f", scale={self.scale:g}"
        return f"std={self.std:g}{scale}{fitted}"
