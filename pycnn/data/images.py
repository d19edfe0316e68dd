"""Operations on image batches (N, C, H, W), uint8 or float, NumPy or CuPy, with no random
draws of their own: the argument checks and dtype rules every transform shares, bilinear
resizing and rotation, RGB <-> HSV and the HSV jitter.  ``pycnn.data.augment`` draws their
parameters per image.

uint8 input is read as RGB in [0, 255], float input as RGB in [0, ``scale``] (default 1.0);
geometric ops keep the dtype (uint8 results are rounded), photometric ops return float32
(float64 stays float64) on the scale of their input.
"""
from __future__ import annotations

import numpy as np

from pycnn.device import array_module


def check_batch(x, name: str = "x", channels: int | None = None):
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"{name} must be a batch (N, C, H, W), got shape {getattr(x, 'shape', None)}")
    if not (x.dtype == np.uint8 or x.dtype.kind == "f"):
        raise TypeError(f"{name} must be uint8 or floating point, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} (RGB) channels, got shape {tuple(x.shape)}")
    return array_module(x)


def work_dtype(x):
    """float32 for uint8/float16/float32 input, float64 for float64 input."""
    return np.float64 if x.dtype == np.float64 else np.float32


def like_input(y, x):
    """``y`` (float) back to the dtype of ``x``: uint8 results are rounded and clipped."""
    xp = array_module(y)
    if x.dtype == np.uint8:
        return xp.clip(xp.rint(y), 0, 255).astype(np.uint8)
    return y.astype(x.dtype, copy=False)


def photometric_scale(x, scale):
    if scale is None:
        return 255.0 if x.dtype == np.uint8 else 1.0
    return float(scale)


def check_range(name, value, low=None, positive=False):
    a, b = value
    if not (a <= b) or (positive and a <= 0) or (low is not None and a < low):
        bound = " > 0" if positive else (f" >= {low}" if low is not None else "")
        raise ValueError(f"{name} must be a pair (low, high) with low <= high{bound}, got {value!r}")
    return float(a), float(b)


def image_size(name: str, size, optional: bool = True):
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


def bilinear_sample(x, ys, xs, fill: str):
    """Bilinear sampling: out[n, c, i, j] = x[n, c] at the point (ys[n, i, j], xs[n, i, j])
    (pixel centres at integer coordinates).  ``fill="edge"`` clamps points to the image
    (a resize), ``fill="zero"`` reads zeros outside it.  Returns float (N, C, h, w)."""
    xp = array_module(x)
    n, c, height, width = x.shape
    dtype = work_dtype(x)
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
    xp = check_batch(x)
    h, w = image_size("size", size, optional=False)
    n, _, height, width = x.shape
    ys = (xp.arange(h, dtype=np.float64) + 0.5) * (height / h) - 0.5
    xs = (xp.arange(w, dtype=np.float64) + 0.5) * (width / w) - 0.5
    grid_y = xp.broadcast_to(ys[None, :, None], (n, h, w))
    grid_x = xp.broadcast_to(xs[None, None, :], (n, h, w))
    return like_input(bilinear_sample(x, grid_y, grid_x, "edge"), x)


def rotate(x, angle, scale=1.0):
    """Rotate image n of ``x`` by ``angle[n]`` degrees (counter-clockwise as displayed) and scale
    it by ``scale[n]`` about its centre; bilinear, zero fill, dtype kept."""
    xp = check_batch(x)
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
    return like_input(bilinear_sample(x, xp.asarray(ys), xp.asarray(xs), "zero"), x)


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
    xp = check_batch(x, channels=3)
    scale = photometric_scale(x, scale)
    dtype = work_dtype(x)
    hsv = rgb_to_hsv(xp.clip(x.astype(dtype) / dtype(scale), 0, 1))

    def per_image(a):
        return xp.asarray(np.broadcast_to(np.asarray(a, dtype=dtype), (len(x),)))[:, None, None]

    h = (hsv[:, 0] + per_image(hue_shift)) % 1
    s = xp.clip(hsv[:, 1] ** per_image(sat_power) * per_image(sat_factor) + per_image(sat_shift), 0, 1)
    v = xp.clip(hsv[:, 2] ** per_image(val_power) * per_image(val_factor) + per_image(val_shift), 0, 1)
    return hsv_to_rgb(xp.stack([h, s, v], axis=1)) * dtype(scale)
