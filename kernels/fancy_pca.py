"""Fancy PCA colour augmentation (Krizhevsky et al. 2012, AlexNet) on a batch on the GPU.

To every pixel of image n add the same RGB offset
    delta[n] = sum_i p_i * alpha[n, i] * lambda_i      (= eigvecs @ (alphas[n] * eigvals))
where p_i (the columns of ``eigvecs``) and lambda_i are the eigenvectors and eigenvalues
of the dataset's 3x3 RGB covariance and alpha[n, i] ~ N(0, 0.1) is drawn once per image
(given as an input so that it can be checked and reproduced).

The covariance comes from ``rgb_moments``: over all pixels of a batch, the count, the sum
of x and the sum of x x^T (x the RGB vector of a pixel), accumulated in float64.  Add the
moments of every batch, then ``pca_from_moments`` gives eigvals, eigvecs.

    count, s, ss = rgb_moments(images)           # images (N, 3, H, W) float32 / float64
    eigvals, eigvecs = pca_from_moments(count, s, ss)
    out = fancy_pca_apply(images, eigvecs, eigvals, alphas)   # alphas (N, 3)
"""
from __future__ import annotations

from types import SimpleNamespace

import numba
from numba import cuda

from . import reduce
from ._launch import array_module, config_1d, launch, per_dtype
from .reduce import REDUCE_THREADS

# the 9 accumulators of rgb_moments: sum r, g, b, then the upper triangle of x x^T
MOMENTS = 9
_OUTER_INDEX = (3, 4, 5, 4, 6, 7, 5, 7, 8)  # (3, 3) row-major -> accumulator


@per_dtype
def _build(T):
    @cuda.jit
    def apply_kernel(images, eigvecs, eigvals, alphas, out):
        # images and out are (N, 3, P), eigvecs (3, 3) (columns are eigenvectors),
        # eigvals (3,), alphas (N, 3): out = images + eigvecs @ (alphas[n] * eigvals)
        n_, three, inner = images.shape
        i = cuda.grid(1)
        if i < images.size:
            n, ch, p = i // (3 * inner), (i // inner) % 3, i % inner
            delta = (eigvecs[ch, 0] * (alphas[n, 0] * eigvals[0])
                     + eigvecs[ch, 1] * (alphas[n, 1] * eigvals[1])
                     + eigvecs[ch, 2] * (alphas[n, 2] * eigvals[2]))
            out[n, ch, p] = images[n, ch, p] + delta

    @cuda.jit
    def moments_kernel(images, moments):
        # images is (N, 3, P); moments is (9,) float64 and zeroed: += sums over the pixels
        # of r, g, b, rr, rg, rb, gg, gb, bb.  1-D grid-stride loop, tree reduce, atomics.
        partial = cuda.shared.array((MOMENTS, REDUCE_THREADS), numba.float64)
        acc = cuda.local.array(MOMENTS, numba.float64)
        n_, three, inner = images.shape
        for t in range(MOMENTS):
            acc[t] = 0.0
        q = cuda.grid(1)
        while q < n_ * inner:
            n, p = q // inner, q % inner
            r = numba.float64(images[n, 0, p])
            g = numba.float64(images[n, 1, p])
            b = numba.float64(images[n, 2, p])
            acc[0] += r
            acc[1] += g
            acc[2] += b
            acc[3] += r * r
            acc[4] += r * g
            acc[5] += r * b
            acc[6] += g * g
            acc[7] += g * b
            acc[8] += b * b
            q += cuda.gridDim.x * cuda.blockDim.x
        reduce.block_sums(partial, acc, MOMENTS)
        if cuda.threadIdx.x == 0:
            for t in range(MOMENTS):
                cuda.atomic.add(moments, t, partial[t, 0])

    return SimpleNamespace(apply=apply_kernel, moments=moments_kernel)


def _check_images(images) -> None:
    if images.dtype.kind != "f":
        raise TypeError(f"images must be a float32 or float64 array, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) RGB, got shape {tuple(images.shape)}")


def _check_shape(name: str, a, expected) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


def fancy_pca_apply(images, eigvecs, eigvals, alphas, out=None):
    """images (N, 3, H, W) + the per-image RGB offset eigvecs @ (alphas[n] * eigvals).

    eigvecs (3, 3) has the eigenvectors as columns (as ``numpy.linalg.eigh`` returns them),
    eigvals is (3,), alphas (N, 3).  Returns ``out`` (a new array unless given; ``out=images``
    works in place)."""
    _check_images(images)
    xp = array_module(images)
    dtype = images.dtype
    n = images.shape[0]
    eigvecs = xp.ascontiguousarray(xp.asarray(eigvecs, dtype=dtype))
    eigvals = xp.ascontiguousarray(xp.asarray(eigvals, dtype=dtype))
    alphas = xp.ascontiguousarray(xp.asarray(alphas, dtype=dtype))
    _check_shape("eigvecs", eigvecs, (3, 3))
    _check_shape("eigvals", eigvals, (3,))
    _check_shape("alphas", alphas, (n, 3))
    images = xp.ascontiguousarray(images)
    if out is None:
        out = xp.empty_like(images)
    _check_shape("out", out, images.shape)
    grid, block = config_1d(images.size)
    launch(_build(dtype).apply, grid, block, images, images.reshape(n, 3, -1), eigvecs, eigvals, alphas,
           out.reshape(n, 3, -1))
    return out


def rgb_moments(images):
    """(count, sum (3,), outer sum (3, 3)) over every pixel of images (N, 3, H, W):
    count = N*H*W, sum = sum_pixels x, outer = sum_pixels x x^T, x the pixel's RGB vector.
    The sums are float64 arrays on the images' device."""
    _check_images(images)
    xp = array_module(images)
    images = xp.ascontiguousarray(images)
    n = images.shape[0]
    count = n * images.shape[2] * images.shape[3]
    moments = xp.empty(MOMENTS, dtype=xp.float64)
    reduce.zero(moments)
    grid = (reduce.reduce_blocks(count),)
    launch(_build(images.dtype).moments, grid, (reduce.REDUCE_THREADS,), images, images.reshape(n, 3, -1), moments)
    outer = moments[xp.asarray(_OUTER_INDEX)].reshape(3, 3)
    return count, moments[:3].copy(), outer


def pca_from_moments(count, sums, outer):
    """(eigvals (3,), eigvecs (3, 3), columns) of the unbiased RGB covariance
    (outer - sums sums^T / count) / (count - 1), as augment.FancyPCA.fit computes it."""
    xp = array_module(sums)
    cov = (outer - xp.outer(sums, sums) / count) / (count - 1)
    return xp.linalg.eigh(cov)
