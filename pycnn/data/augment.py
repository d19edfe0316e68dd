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
from pycnn.device import array_module, cpp_extension, to_host

__all__ = ["Transform", "Compose", "RandomFlip", "RandomCrop", "RandomScaleCrop", "RandomRotation",
           "ColourJitter", "ColorJitter", "FancyPCA", "resize_bilinear", "rgb_to_hsv", "hsv_to_rgb",
           "jitter_hsv", "as_generator"]


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


def _check_batch(x, name: str = "x", channels: int | None = None):
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"{name} must be a batch (N, C, H, W), got shape {getattr(x, 'shape', None)}")
    if not (x.dtype == np.uint8 or x.dtype.kind == "f"):
        raise TypeError(f"{name} must be uint8 or floating point, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} (RGB) channels, got shape {tuple(x.shape)}")
    return array_module(x)


def _work_dtype(x):
    """float32 for uint8/float16/float32 input, float64 for float64 input."""
    return np.float64 if x.dtype == np.float64 else np.float32


def _like_input(y, x):
    """``y`` (float) back to the dtype of ``x``: uint8 results are rounded and clipped."""
    xp = array_module(y)
    if x.dtype == np.uint8:
        return xp.clip(xp.rint(y), 0, 255).astype(np.uint8)
    return y.astype(x.dtype, copy=False)


def _photometric_scale(x, scale):
    if scale is None:
        return 255.0 if x.dtype == np.uint8 else 1.0
    return float(scale)


def _check_range(name, value, low=None, positive=False):
    a, b = value
    if not (a <= b) or (positive and a <= 0) or (low is not None and a < low):
        bound = " > 0" if positive else (f" >= {low}" if low is not None else "")
        raise ValueError(f"{name} must be a pair (low, high) with low <= high{bound}, got {value!r}")
    return float(a), float(b)


def _image_size(name: str, size, optional: bool = True):
    """``size`` as (h, w) of positive integers (an integer: a square), or None where optional."""
    if size is None and optional:
        return None
    pair = (size, size) if np.isscalar(size) else size
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in pair):
        raise ValueError(f"{name} must be {'None, ' if optional else ''}a positive integer or a pair (h, w) of them, "
                         f"got {size!r}")
    return int(pair[0]), int(pair[1])


def _bilinear(x, ys, xs, fill: str):
    """Bilinear sampling: out[n, c, i, j] = x[n, c] at the point (ys[n, i, j], xs[n, i, j])
    (pixel centres at integer coordinates).  ``fill="edge"`` clamps points to the image
    (a resize), ``fill="zero"`` reads zeros outside it.  Returns float (N, C, h, w)."""
    xp = array_module(x)
    n, c, height, width = x.shape
    dtype = _work_dtype(x)
    if n == 0:  # an empty batch: nothing to sample
        return xp.empty((0, c, *ys.shape[1:]), dtype)
    # channels last, converted once: row n*H*W + y*W + x holds the C values of one pixel
    values = x.transpose(0, 2, 3, 1).astype(dtype).reshape(n * height * width, c)
    base = xp.arange(n).reshape(n, 1) * (height * width)                   # (N, 1) image offsets
    ys, xs = ys.astype(dtype, copy=False), xs.astype(dtype, copy=False)
    if fill == "edge":
        ys, xs = xp.clip(ys, 0, height - 1), xp.clip(xs, 0, width - 1)
    y0, x0 = xp.floor(ys), xp.floor(xs)
    wy, wx = ys - y0, xs - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    out = None
    for dy, weight_y in ((0, 1 - wy), (1, wy)):
        for dx, weight_x in ((0, 1 - wx), (1, wx)):
            yi, xi = y0 + dy, x0 + dx
            weight = weight_y * weight_x
            if fill == "zero":
                inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
                weight = weight * inside
                yi, xi = xp.clip(yi, 0, height - 1), xp.clip(xi, 0, width - 1)
            elif dy or dx:  # edge: y0, x0 are inside; the +1 neighbour may fall off (with weight 0)
                yi, xi = xp.minimum(yi, height - 1), xp.minimum(xi, width - 1)
            index = base + (yi * width + xi).reshape(n, -1)                  # (N, h*w)
            term = xp.take(values, index, axis=0) * weight.reshape(n, -1, 1)  # (N, h*w, C)
            out = term if out is None else out + term
    return xp.ascontiguousarray(out.reshape(n, *ys.shape[1:], c).transpose(0, 3, 1, 2))


def resize_bilinear(x, size):
    """Resize a batch (N, C, H, W) to ``size = (h, w)`` by bilinear interpolation with half-pixel
    centres (as OpenCV and ``torch.nn.functional.interpolate(align_corners=False)``, no
    antialiasing).  The dtype is kept (uint8 results are rounded)."""
    xp = _check_batch(x)
    h, w = _image_size("size", size, optional=False)
    n, _, height, width = x.shape
    ys = (xp.arange(h, dtype=np.float64) + 0.5) * (height / h) - 0.5
    xs = (xp.arange(w, dtype=np.float64) + 0.5) * (width / w) - 0.5
    grid_y = xp.broadcast_to(ys[None, :, None], (n, h, w))
    grid_x = xp.broadcast_to(xs[None, None, :], (n, h, w))
    return _like_input(_bilinear(x, grid_y, grid_x, "edge"), x)


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
        xp = _check_batch(x)
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
        self.size = _image_size("size", size)

    def __call__(self, x, rng=None):
        xp = _check_batch(x)
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
        self.scale = _check_range("scale", scale, positive=True)
        self.size = _image_size("size", size)

    def __call__(self, x, rng=None):
        xp = _check_batch(x)
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
        return _like_input(_bilinear(x, xp.asarray(grid_y), xp.asarray(grid_x), "edge"), x)

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
        self.scale = _check_range("scale", scale, positive=True)

    def draw(self, n: int, rng) -> dict:
        rng = as_generator(rng)
        return {"angle": rng.uniform(-self.degrees, self.degrees, size=n), "scale": rng.uniform(*self.scale, size=n)}

    def __call__(self, x, rng=None):
        _check_batch(x)
        return rotate(x, **self.draw(len(x), rng))

    def _fields(self):
        return f"degrees={self.degrees:g}, scale=({self.scale[0]:g}, {self.scale[1]:g})"


def rotate(x, angle, scale=1.0):
    """Rotate image n of ``x`` by ``angle[n]`` degrees (counter-clockwise as displayed) and scale
    it by ``scale[n]`` about its centre; bilinear, zero fill, dtype kept."""
    xp = _check_batch(x)
    n, _, height, width = x.shape
    theta = np.deg2rad(np.broadcast_to(np.asarray(angle, dtype=np.float64), (n,)))
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (n,))
    cy, cx = (height - 1) / 2, (width - 1) / 2
    dy = (np.arange(height) - cy)[None, :, None]
    dx = (np.arange(width) - cx)[None, None, :]
    cos, sin = (np.cos(theta) / s)[:, None, None], (np.sin(theta) / s)[:, None, None]
    # inverse map from the output pixel to the source: R(-angle) / scale
    xs = cos * dx - sin * dy + cx   # (N, H, W)
    ys = sin * dx + cos * dy + cy
    return _like_input(_bilinear(x, xp.asarray(ys), xp.asarray(xs), "zero"), x)


# ------------------------------------------------------------------------------ colour

def rgb_to_hsv(rgb):
    """(N, 3, H, W) RGB in [0, 1] -> HSV, each in [0, 1] (hue as a fraction of a turn); the
    formulas of ``colorsys.rgb_to_hsv``, vectorised."""
    xp = array_module(rgb)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    maxc = xp.maximum(xp.maximum(r, g), b)
    minc = xp.minimum(xp.minimum(r, g), b)
    delta = maxc - minc
    grey = delta <= 0
    s = xp.where(maxc > 0, delta / xp.where(maxc > 0, maxc, 1), 0)
    safe = xp.where(grey, 1, delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = xp.where(r == maxc, bc - gc, xp.where(g == maxc, 2 + rc - bc, 4 + gc - rc))
    h = xp.where(grey, 0, (h / 6) % 1)
    return xp.stack([h, xp.where(grey, 0, s), maxc], axis=1).astype(rgb.dtype, copy=False)


def hsv_to_rgb(hsv):
    """(N, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]; ``colorsys.hsv_to_rgb``, vectorised."""
    xp = array_module(hsv)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    sector = xp.floor(h * 6)
    f = h * 6 - sector
    sector = sector.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))

    def pick(*per_sector):
        out = per_sector[5]
        for k in range(4, -1, -1):
            out = xp.where(sector == k, per_sector[k], out)
        return out

    rgb = xp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], axis=1)
    return rgb.astype(hsv.dtype, copy=False)


def jitter_hsv(x, hue_shift, sat_power, sat_factor, sat_shift, val_power, val_factor, val_shift, scale=None):
    """The colour jitter of Wu et al. with given per-image draws (each (N,)): in HSV,
    ``S <- clip(S ** sat_power * sat_factor + sat_shift, 0, 1)``, the same for V, and
    ``H <- (H + hue_shift) mod 1``.  ``x`` is RGB on [0, scale] (uint8: [0, 255]); returns
    float32 (float64 for float64 input) on the same scale."""
    xp = _check_batch(x, channels=3)
    scale = _photometric_scale(x, scale)
    dtype = _work_dtype(x)
    hsv = rgb_to_hsv(xp.clip(x.astype(dtype) / dtype(scale), 0, 1))

    def per_image(a):
        return xp.asarray(np.broadcast_to(np.asarray(a, dtype=dtype), (len(x),)))[:, None, None]

    h = (hsv[:, 0] + per_image(hue_shift)) % 1
    s = xp.clip(hsv[:, 1] ** per_image(sat_power) * per_image(sat_factor) + per_image(sat_shift), 0, 1)
    v = xp.clip(hsv[:, 2] ** per_image(val_power) * per_image(val_factor) + per_image(val_shift), 0, 1)
    return hsv_to_rgb(xp.stack([h, s, v], axis=1)) * dtype(scale)


class ColourJitter(Transform):
    """Colour jitter of Wu et al., "Deep Image" (2015), as summarised in CS231n lecture 6:
    in HSV, raise S and V to a power in ``power`` (drawn log-uniformly, so brightening and
    darkening are equally likely), multiply them by a factor in ``factor``, add a value in
    ``shift``, and add a value in ``hue_shift`` to H (wrapping round).  S and V get
    independent draws; all pixels of one image share them.  Input RGB on [0, scale]
    (uint8: [0, 255], float: [0, 1] unless ``scale`` says otherwise); output float on the
    same scale."""

    def __init__(self, power=(0.25, 4.0), factor=(0.7, 1.4), shift=(-0.1, 0.1), hue_shift=(-0.1, 0.1), scale=None):
        self.power = _check_range("power", power, positive=True)
        self.factor = _check_range("factor", factor, low=0)
        self.shift = _check_range("shift", shift)
        self.hue_shift = _check_range("hue_shift", hue_shift)
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
        _check_batch(x, channels=3)
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

        _check_batch(x, channels=3)
        alphas = self.alphas(len(x), rng)
        if x.dtype not in (np.uint8, np.float32, np.float64):  # float16: work in float32
            x = x.astype(np.float32)
        with pycnn.no_grad():
            out = pycnn.apply_op("fancy_pca", x, eigvecs=self.eigvecs, eigvals=self.eigvals, alphas=alphas,
                                 scale=_photometric_scale(x, self.scale))
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
