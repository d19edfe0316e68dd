"""Fancy PCA colour augmentation (Krizhevsky et al. 2012, AlexNet, section 4.1): NumPy reference.

Every pixel of image n gets the same RGB offset

    delta[n] = scale * eigvecs @ (alphas[n] * eigvals)      (= scale * sum_i p_i alpha_ni lambda_i)

where the columns p_i of ``eigvecs`` (3, 3) and ``eigvals`` (3,) are the eigenvectors and
eigenvalues of the data set's RGB covariance on the [0, 1] scale (``augment.FancyPCA.fit``),
``alphas`` (N, 3) are drawn by the caller (AlexNet: N(0, 0.1)), and ``scale`` is the pixel
scale of the images: 255 for uint8 (the default there), 1 for float (the default there).

    images (N, 3, H, W) uint8 / float32 / float64  ->  out (N, 3, H, W) float32 / float32 / float64
    out = images + delta[:, :, None, None]

The offsets are computed in float64 and rounded once to the output dtype.  Backward: the
identity for float images (the gradient of an additive offset); uint8 images are not
differentiable (their gradient is None), and the parameters never are.
"""
from __future__ import annotations

import numpy as np

import pycnn.ops._util as _util
from pycnn.device import array_module
from pycnn.ops.registry import BenchCase, Sample, declare

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))


def output_dtype(images) -> np.dtype:
    """float64 for float64 images, float32 for uint8 and float32 images."""
    return np.dtype(np.float64) if images.dtype == np.float64 else np.dtype(np.float32)


def pixel_scale(images, scale=None) -> float:
    """``scale``, or its default: 255 for uint8 images, 1 for float images."""
    if scale is None:
        return 255.0 if images.dtype == np.uint8 else 1.0
    return float(scale)


def colour_offsets(eigvecs, eigvals, alphas, scale: float):
    """(N, 3) float64 on the parameters' device: scale * eigvecs @ (alphas[n] * eigvals) per row."""
    xp = array_module(alphas)
    eigvecs, eigvals, alphas = (xp.asarray(a, dtype=np.float64) for a in (eigvecs, eigvals, alphas))
    return ((alphas * eigvals) @ eigvecs.T) * scale


def _check_fancy_pca(images, eigvecs=None, eigvals=None, alphas=None, scale=None):
    dtype = getattr(images, "dtype", None)
    if dtype is None:
        raise TypeError(f"images must be an array, got {type(images).__name__}")
    if np.dtype(dtype) not in IMAGE_DTYPES:
        raise TypeError(f"images must be uint8, float32 or float64, got {dtype}")
    _util.check_ndim("images", images, 4)
    if images.shape[1] != 3:
        raise ValueError(f"images must be RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    for name, a, shape in (("eigvecs", eigvecs, (3, 3)), ("eigvals", eigvals, (3,)),
                           ("alphas", alphas, (images.shape[0], 3))):
        if a is None:
            raise TypeError(f"fancy_pca needs {name} (shape {shape})")
        if not hasattr(a, "shape"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        _util.check_shape(name, a, shape)
    if scale is not None:
        _util.check_positive_number("scale", scale)


def fancy_pca_forward(ctx, images, eigvecs, eigvals, alphas, scale=None):
    xp = array_module(images)
    dtype = output_dtype(images)
    ctx.differentiable = images.dtype != np.uint8
    delta = xp.asarray(colour_offsets(eigvecs, eigvals, alphas, pixel_scale(images, scale)).astype(dtype))  # (N, 3)
    return images.astype(dtype, copy=False) + delta[:, :, None, None]


def fancy_pca_backward(ctx, grad):
    # d(images + delta)/d images = 1; uint8 images have no gradient
    return (grad if ctx.differentiable else None,)


def _fancy_pca_samples(rng, dtype):
    """Float images (uint8 ones are not differentiable: tests/test_cpp_maps.py covers them)."""
    def params(n, scale=None):
        eigvals, eigvecs = np.linalg.eigh(np.cov(rng.uniform(0, 1, (3, 40))))
        p = {"eigvecs": eigvecs, "eigvals": eigvals, "alphas": rng.normal(0, 0.1, (n, 3))}
        return p if scale is None else {**p, "scale": scale}
    return [Sample((rng.uniform(0, 1, (2, 3, 4, 5)).astype(dtype),), params(2)),
            Sample((rng.uniform(0, 255, (1, 3, 3, 7)).astype(dtype),), params(1, 255.0)),
            Sample((rng.uniform(0, 1, (3, 3, 1, 1)).astype(dtype),), params(3, 2.0))]


def _fancy_pca_flops(x_shape, **params):
    return int(np.prod(x_shape))  # one add per element (the 3x3 products per image are negligible)


def _fancy_pca_bytes(x_shape, itemsize=4, **params):
    """Read the images, write the output (itemsize: the images'): uint8 images (itemsize 1)
    read 1 byte per element and write 4 (float32)."""
    return (itemsize + (4 if itemsize == 1 else itemsize)) * int(np.prod(x_shape))


def _torch_fancy_pca(x, eigvecs=None, eigvals=None, alphas=None, scale=None):
    """x + scale * eigvecs @ (alphas[n] * eigvals), per image, written in torch."""
    import torch
    scale = (255.0 if x.dtype == torch.uint8 else 1.0) if scale is None else scale
    t = torch.as_tensor
    delta = (t(eigvecs) @ (t(alphas) * t(eigvals)).T).T * scale  # (N, 3)
    dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype  # uint8 images give float32
    return x.to(dtype) + delta.to(dtype)[:, :, None, None]


def _bench_images(rng, shapes, params):
    """uint8 RGB images and the colour statistics of random pixels."""
    (shape,) = shapes
    eigvals, eigvecs = np.linalg.eigh(np.cov(rng.uniform(0, 1, (3, 100))))
    params = {"eigvecs": eigvecs, "eigvals": eigvals, "alphas": rng.normal(0, 0.1, (shape[0], 3)), **params}
    return (rng.integers(0, 256, shape, dtype=np.uint8),), params


declare("fancy_pca", forward=fancy_pca_forward, backward=fancy_pca_backward, check=_check_fancy_pca,
        flops=_fancy_pca_flops, bytes=_fancy_pca_bytes, samples=_fancy_pca_samples, torch=_torch_fancy_pca,
        backward_flops=lambda x_shape, **params: 0, backward_bytes=lambda x_shape, itemsize=4, **params: 0,
        bench=(BenchCase(((256, 3, 32, 32),), phases=("fwd",)),), bench_inputs=_bench_images)
