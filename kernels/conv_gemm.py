"""conv3x3 as matrix products (im2col + GEMM), with the data movement in Numba kernels and
the products in cuBLAS (``xp.matmul``: CuPy on a GPU, NumPy in the simulator).

Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), y is (N, K, H, W); P = N*H*W pixels.
The column matrix has one row per (input channel, tap) and one column per pixel:

    cols[c*9 + i*3 + j, n*H*W + h*W + w] = x_padded[n, c, h + i, w + j]        (C*9, P)

Forward:           Y2 = weight.reshape(K, C*9) @ cols                          (K, P)
                   y[n, k, h, w] = act(Y2[k, n*H*W + h*W + w] + bias[k])       (epilogue)
Backward, from grad (N, K, H, W) laid out as G2 (K, P) (``channels_first``, fused with the
activation's backward where there is one):
                   grad_weight = G2 @ cols.T                                   (K, C*9)
                   grad_cols   = weight.reshape(K, C*9).T @ G2                 (C*9, P)
                   grad_x[n, c, h, w] = sum_{i,j} grad_cols[c*9 + i*3 + j, pixel (h+1-i, w+1-j)]
The last line (``col2im``) gathers the 9 taps of each input pixel, so every output
element is written once: no atomics, no zero fill.

Every kernel is one thread per element with the row index in blockIdx.y (a channel or a
(channel, tap) pair, fixed per block) and the pixel in x, so loads and stores of a warp
are contiguous.  Arrays are passed flat (1-D) with their sizes as int32 scalars.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import cuda

from . import activations
from ._launch import THREADS_1D, kernel_named, launch, per_dtype
from .reduce import REDUCE_THREADS, block_sum

MAX_GRID = 65535  # grid y and z limits


@cuda.jit(device=True)
def grid_position():
    """(row, image, pixel of the plane) of this thread in a ``_grid`` launch."""
    return cuda.blockIdx.z, cuda.blockIdx.y, cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x


@per_dtype
def _build(T):
    weight_grad = activations.activation("prelu", T).weight_grad

    @cuda.jit
    def im2col(x, cols, channels, height, width, pixels):
        # x is (N*C*H*W,), cols is (C*9*P,); grid (ceil(H*W / threads), N, C*9)
        row, n, p = grid_position()
        plane = height * width
        if p < plane:
            c, tap = row // 9, row % 9
            hh, ww = p // width + tap // 3 - 1, p % width + tap % 3 - 1
            value = T(0)
            if 0 <= hh < height and 0 <= ww < width:
                value = x[(n * channels + c) * plane + hh * width + ww]
            cols[row * pixels + n * plane + p] = value

    @cuda.jit
    def col2im(grad_cols, grad_x, channels, height, width, pixels):
        # grad_cols is (C*9*P,), grad_x is (N*C*H*W,); grid (ceil(H*W / threads), N, C)
        c, n, p = grid_position()
        plane = height * width
        if p < plane:
            h, w = p // width, p % width
            total = T(0)
            for i in range(3):
                hh = h + 1 - i
                if 0 <= hh < height:
                    for j in range(3):
                        ww = w + 1 - j
                        if 0 <= ww < width:
                            total += grad_cols[(c * 9 + i * 3 + j) * pixels + n * plane + hh * width + ww]
            grad_x[(n * channels + c) * plane + p] = total

    @cuda.jit
    def prelu_slope_grad(z, grad, partial, outputs, plane, pixels):
        # partial is (K * blocks,): partial[k * blocks + b] = sum over block b's pixels of
        # grad * z where z <= 0; grid (blocks, K), each thread loops with a grid stride
        k = cuda.blockIdx.y
        acc = T(0)
        q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while q < pixels:
            n, p = q // plane, q % plane
            src = (n * outputs + k) * plane + p
            acc += weight_grad(z[src], grad[src])
            q += cuda.gridDim.x * cuda.blockDim.x
        total = block_sum(cuda.shared.array(REDUCE_THREADS, T), acc)
        if cuda.threadIdx.x == 0:
            partial[k * cuda.gridDim.x + cuda.blockIdx.x] = total

    return SimpleNamespace(im2col=im2col, col2im=col2im, prelu_slope_grad=prelu_slope_grad)


@per_dtype
def _build_activation(T, activation):
    """The kernels that apply ``activation`` (None: none) or its gradient."""
    act = activations.activation(activation, T)
    value, grad, per_channel = act.value, act.grad, act.per_channel
    saved = activation is not None  # channels_first reads z (it is not passed without an activation)

    @kernel_named(f"epilogue_{activation or 'identity'}")
    def epilogue(y2, bias, slopes, y, z, outputs, plane, pixels, a, has_bias, keep_z):
        # y2 is (K*P,) pixel-major per channel; y and z are (N*K*H*W,); bias, slopes (K,)
        # (read only when has_bias / per channel); z (the pre-activation) is written when
        # keep_z; grid (ceil(H*W / threads), N, K)
        k, n, p = grid_position()
        if p < plane:
            out = (n * outputs + k) * plane + p
            v = y2[k * pixels + n * plane + p]
            if has_bias:
                v += bias[k]
            if keep_z:
                z[out] = v
            y[out] = value(v, slopes[k] if per_channel else a)

    @kernel_named(f"channels_first_{activation or 'identity'}")
    def channels_first(grad_y, z, slopes, g2, outputs, plane, pixels, a):
        # grad_y and z are (N*K*H*W,), g2 is (K*P,); g2 = d act/dz * grad_y, transposed
        # grid (ceil(H*W / threads), N, K)
        k, n, p = grid_position()
        if p < plane:
            src = (n * outputs + k) * plane + p
            g = grad_y[src]
            if saved:
                g = grad(z[src], g, slopes[k] if per_channel else a)
            g2[k * pixels + n * plane + p] = g

    return SimpleNamespace(epilogue=epilogue, channels_first=channels_first)


def _grid(n: int, plane: int, rows: int):
    """(grid, block) over (pixels of a plane, images, rows): threads cover one plane (fewer
    than 256 for small planes, a multiple of the warp size)."""
    if rows > MAX_GRID or n > MAX_GRID:
        raise ValueError(f"conv3x3 gemm: batch {n} or {rows} channel rows exceed the grid limit {MAX_GRID}")
    threads = min(THREADS_1D, max(32, 1 << (plane - 1).bit_length()))
    return (-(-plane // threads), n, rows), (threads,)


def _i32(v):
    return np.int32(v)


def _flat(a):
    return a.reshape(-1)


def im2col(x, cols) -> None:
    """cols (C*9, N*H*W) from x (N, C, H, W); both C-contiguous."""
    n, c, h, w = x.shape
    pixels = n * h * w
    grid, block = _grid(n, h * w, c * 9)
    launch(_build(x.dtype).im2col, grid, block, x, _flat(x), _flat(cols), _i32(c), _i32(h), _i32(w), _i32(pixels))


def col2im(grad_cols, grad_x) -> None:
    """grad_x (N, C, H, W) = the adjoint of im2col applied to grad_cols (C*9, N*H*W)."""
    n, c, h, w = grad_x.shape
    pixels = n * h * w
    grid, block = _grid(n, h * w, c)
    launch(_build(grad_x.dtype).col2im, grid, block, grad_x, _flat(grad_cols), _flat(grad_x),
           _i32(c), _i32(h), _i32(w), _i32(pixels))


def epilogue(y2, bias, slopes, y, z, activation=None, slope=0.01, alpha=1.0) -> None:
    """y (N, K, H, W) = act(y2 (K, N*H*W) transposed + bias); z gets the pre-activation
    when it is not None.  bias (K,) or None; ``slopes`` (K,) are prelu's (else None)."""
    n, k, h, w = y.shape
    pixels = n * h * w
    grid, block = _grid(n, h * w, k)
    keep_z = z is not None
    activations.check_slopes(activation, slopes, "conv3x3_act")
    unused = y2.reshape(-1)[:1]  # stands for an absent array (never read or written)
    launch(_build_activation(y.dtype, activation).epilogue, grid, block, y, _flat(y2),
           bias if bias is not None else unused, slopes if slopes is not None else unused, _flat(y),
           _flat(z) if keep_z else unused, _i32(k), _i32(h * w), _i32(pixels),
           activations.scalar(activation, y.dtype, slope, alpha), np.uint8(bias is not None), np.uint8(keep_z))


def channels_first(grad, g2, z=None, slopes=None, activation=None, slope=0.01, alpha=1.0) -> None:
    """g2 (K, N*H*W) = grad (N, K, H, W) transposed, times d act/dz (from the saved
    pre-activation z) when there is an activation."""
    n, k, h, w = grad.shape
    pixels = n * h * w
    grid, block = _grid(n, h * w, k)
    activations.check_slopes(activation, slopes, "conv3x3_act")
    unused = _flat(grad)[:1]  # stands for an absent array (never read)
    launch(_build_activation(grad.dtype, activation).channels_first, grid, block, grad, _flat(grad),
           _flat(z) if z is not None else unused, slopes if slopes is not None else unused, _flat(g2), _i32(k),
           _i32(h * w), _i32(pixels), activations.scalar(activation, grad.dtype, slope, alpha))


def prelu_slope_grad(z, grad, xp):
    """(K,) sums over N, H, W of grad * z where z <= 0 (prelu's slope gradient)."""
    n, k, h, w = z.shape
    pixels = n * h * w
    blocks = max(1, min(64, -(-pixels // (REDUCE_THREADS * 16))))
    partial = xp.empty((k * blocks,), dtype=z.dtype)
    launch(_build(z.dtype).prelu_slope_grad, (blocks, k), (REDUCE_THREADS,), z, _flat(z), _flat(grad), partial,
           _i32(k), _i32(h * w), _i32(pixels))
    return partial.reshape(k, blocks).sum(axis=1)
