"""conv3x3 (stride 1, zero padding 1, cross-correlation as in ``pycnn.ops.conv``), direct.

    y[n, k, h, w] = b[k] + sum_{c, i, j} weight[k, c, i, j] * x_padded[n, c, h + i, w + j]

Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), bias is (K,), y is (N, K, H, W).

Forward (``conv_tiled``): a block computes a TILE x TILE patch of output pixels for
KB = 8 output channels of one image; one thread per pixel, KB accumulators per thread.
For each input channel the block stages in shared memory
  * the (TILE + 2) x (TILE + 2) input patch with its 1-pixel halo (zeros outside the image),
  * the KB x 9 weights of that channel,
so each input value is read from global memory once per block instead of 9 * KB times.

Input gradient: the same kernel.  grad_x is the padded cross-correlation of grad with the
flipped, transposed weights (flip=True reads weight[c, k, 2 - i, 2 - j] with the roles of
input and output channels exchanged):
    grad_x[n, c, h, w] = sum_{k, i, j} weight[k, c, 2 - i, 2 - j] * grad_padded[n, k, h + i, w + j]

Weight gradient: grad_w[k, c, i, j] = sum_{n, h, w} grad[n, k, h, w] * x_padded[n, c, h + i, w + j],
a reduction over N*H*W: grid (K, C, S) — each block reduces a grid-stride share of the
pixels into 9 sums (shared-memory tree reduction), then adds them with atomics.
Bias gradient: per-channel sum of grad (``reduce.channel_sum``).
"""
from __future__ import annotations

import functools

from numba import cuda

from . import reduce
from ._launch import launch, numba_type
from .reduce import REDUCE_THREADS

KB = 8  # output channels per block of the tiled kernel


def tile_for(h: int, w: int) -> int:
    """Output patch side of the tiled kernel: 8 x 8 threads for small planes, else 16 x 16."""
    return 8 if max(h, w) <= 8 else 16


@functools.cache
def _conv_tiled(T, tile):
    halo = tile + 2

    @cuda.jit
    def conv_tiled(x, weight, bias, y, flip):
        # x is (N, C, H, W), y is (N, K, H, W), bias is (K,);
        # weight is (K, C, 3, 3), or (C, K, 3, 3) read flipped when flip is True.
        # grid (tiles along W * tiles along H, ceil(K / KB), N), block (tile, tile)
        patch = cuda.shared.array((halo, halo), T)   # input channel c around the tile
        taps = cuda.shared.array((KB, 9), T)         # weights of channel c for KB outputs
        acc = cuda.local.array(KB, T)
        n_, channels, h_, w_ = x.shape
        outputs = y.shape[1]
        tiles_w = (w_ + tile - 1) // tile
        h0 = (cuda.blockIdx.x // tiles_w) * tile
        w0 = (cuda.blockIdx.x % tiles_w) * tile
        k0 = cuda.blockIdx.y * KB
        n = cuda.blockIdx.z
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * tile + tx
        h, w = h0 + ty, w0 + tx

        for kk in range(KB):
            acc[kk] = bias[k0 + kk] if k0 + kk < outputs else T(0)

        for c in range(channels):
            # stage the input patch with its halo: (tile + 2)^2 values, tile^2 threads
            for idx in range(tid, halo * halo, tile * tile):
                r, s = idx // halo, idx % halo
                hh, ww = h0 + r - 1, w0 + s - 1
                inside = 0 <= hh < h_ and 0 <= ww < w_
                patch[r, s] = x[n, c, hh, ww] if inside else T(0)
            # stage the KB x 9 weights of channel c
            for idx in range(tid, KB * 9, tile * tile):
                kk, t = idx // 9, idx % 9
                k = k0 + kk
                value = T(0)
                if k < outputs:
                    if flip:
                        value = weight[c, k, 2 - t // 3, 2 - t % 3]
                    else:
                        value = weight[k, c, t // 3, t % 3]
                taps[kk, t] = value
            cuda.syncthreads()

            # 3x3 neighbourhood of this thread's pixel, then KB dot products of 9
            v0, v1, v2 = patch[ty, tx], patch[ty, tx + 1], patch[ty, tx + 2]
            v3, v4, v5 = patch[ty + 1, tx], patch[ty + 1, tx + 1], patch[ty + 1, tx + 2]
            v6, v7, v8 = patch[ty + 2, tx], patch[ty + 2, tx + 1], patch[ty + 2, tx + 2]
            for kk in range(KB):
                acc[kk] += (taps[kk, 0] * v0 + taps[kk, 1] * v1 + taps[kk, 2] * v2
                            + taps[kk, 3] * v3 + taps[kk, 4] * v4 + taps[kk, 5] * v5
                            + taps[kk, 6] * v6 + taps[kk, 7] * v7 + taps[kk, 8] * v8)
            cuda.syncthreads()  # before the next channel overwrites patch and taps

        if h < h_ and w < w_:
            for kk in range(KB):
                if k0 + kk < outputs:
                    y[n, k0 + kk, h, w] = acc[kk]

    return conv_tiled


@functools.cache
def _conv_grad_weight(T):
    @cuda.jit
    def conv_grad_weight(x, grad, grad_w):
        # x is (N, C, H, W), grad is (N, K, H, W), grad_w is (K, C, 3, 3) and zeroed
        # grid (K, C, S), REDUCE_THREADS threads: block (k, c, s) sums pixels s, s + S, ...
        partial = cuda.shared.array((9, REDUCE_THREADS), T)
        acc = cuda.local.array(9, T)
        n_, channels, h_, w_ = x.shape
        k, c = cuda.blockIdx.x, cuda.blockIdx.y
        for t in range(9):
            acc[t] = T(0)
        e = cuda.blockIdx.z * cuda.blockDim.x + cuda.threadIdx.x
        while e < n_ * h_ * w_:
            n, r = e // (h_ * w_), e % (h_ * w_)
            h, w = r // w_, r % w_
            g = grad[n, k, h, w]
            for i in range(3):
                hh = h + i - 1
                if 0 <= hh < h_:
                    for j in range(3):
                        ww = w + j - 1
                        if 0 <= ww < w_:
                            acc[i * 3 + j] += g * x[n, c, hh, ww]
            e += cuda.gridDim.z * cuda.blockDim.x
        reduce.block_sums(partial, acc, 9)
        if cuda.threadIdx.x == 0:
            for t in range(9):
                cuda.atomic.add(grad_w, (k, c, t // 3, t % 3), partial[t, 0])

    return conv_grad_weight


def _launch_tiled(x, weight, bias, y, flip: bool) -> None:
    n, _, h, w = x.shape
    outputs = y.shape[1]
    tile = tile_for(h, w)
    grid = (-(-h // tile) * -(-w // tile), -(-outputs // KB), n)
    launch(_conv_tiled(numba_type(x.dtype), tile), grid, (tile, tile), x, x, weight, bias, y, flip)


def conv3x3_forward(x, weight, bias, y) -> None:
    """y = conv3x3(x, weight) + bias; bias is a (K,) array (zeros when the layer has none)."""
    _launch_tiled(x, weight, bias, y, False)


def conv3x3_grad_x(grad, weight, zeros_c, grad_x) -> None:
    """grad_x (N, C, H, W) from grad (N, K, H, W); zeros_c is a (C,) zero array (no bias)."""
    _launch_tiled(grad, weight, zeros_c, grad_x, True)


def conv3x3_grad_weight(x, grad, grad_w) -> None:
    """grad_w (K, C, 3, 3) = sum over the batch and pixels of grad * shifted x."""
    n, c, h, w = x.shape
    k = grad.shape[1]
    reduce.zero(grad_w)
    grid = (k, c, reduce.reduce_blocks(n * h * w, max_blocks=64))
    launch(_conv_grad_weight(numba_type(x.dtype)), grid, (reduce.REDUCE_THREADS,), x, x, grad, grad_w)


def conv3x3_grad_bias(grad, grad_b) -> None:
    """grad_b (K,) = sum of grad over N, H, W."""
    reduce.channel_sum(grad, grad_b)
