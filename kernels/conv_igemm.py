"""conv3x3 as implicit GEMM: the matrix products of conv_gemm without the im2col matrix.

Shapes: x is (N, C, H, W), weight is (K, C, 3, 3), y is (N, K, H, W); P = N*H*W pixels and
R = C*9 (input channel, tap) pairs.  The column matrix of conv_gemm,

    cols[r, p] = x_padded[n, c, h + i, w + j]      r = c*9 + i*3 + j,  p = n*H*W + h*W + w

is never stored: each block gathers the (BK x BN) piece of it that it multiplies next,
straight from x (zeros outside the image).  Three products, one kernel shape:

    forward       Y[k, p]      = sum_r  weight[k, r]  cols_x[r, p]     (+ bias, activation)
    grad_x        GX[c, p]     = sum_r' wflip[c, r']  cols_g[r', p]    r' = k*9 + tap,
                  wflip[c, k*9 + i*3 + j] = weight[k, c, 2 - i, 2 - j]: the same kernel on g,
                  reading weight where wflip's entries are (no flipped copy)
    grad_weight   GW[k, r]     = sum_p  g[k, p]  cols_x[r, p]           (split over p, then
                  the splits summed in a fixed order: no atomics, the same bits every run)

where g (K, P) is the output gradient in channels-first layout, times the activation's
derivative (conv_gemm.channels_first).  Tiling: a block of 16 x 16 threads computes a
BM x BN = 64 x 64 tile of the product, each thread a 4 x 4 register block (rows ty + 16 i,
columns tx + 16 j: a warp's loads and stores of one row are contiguous); the reduction runs
in steps of BK = 8 through two shared-memory buffers, the next step's global loads issued
before the current step's multiply-adds (double buffering: one barrier per step).

With ``tensor_cores`` (float32 only, algo "igemm_tf32") the same tiles are multiplied on
TF32 tensor cores (kernels/tensor_cores.py): the operands are rounded to TF32 as they are
stored in shared memory, and each of the block's 8 warps computes a 32 x 16 piece of the
tile as 2 x 2 mma.sync m16n8k8 per reduction step, accumulating in float32.  The thread
that holds accumulator [i, j] differs (``place``); loads, tiles and epilogue are shared.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from numba import cuda

from . import activations
from . import tensor_cores as tensor_core_ops
from ._launch import kernel_named, launch, per_dtype
from .tensor_cores import mma_tf32, tf32_round

BM = 64   # rows of a block's tile of the product: output channels (in grad_x: input channels)
BN = 64   # columns of a block's tile (pixels; grad_weight: (channel, tap) pairs)
BK = 8    # reduction step
TS = 16   # threads per side of the block: 16 x 16, each a 4 x 4 block of the tile
THREADS = TS * TS
MAX_SPLITS = 64  # of grad_weight's reduction over pixels
PAD = 8   # a tile row is BM + PAD long: the tensor-core fragment loads (rows t, t + 4 of 8
          # lanes each) and the tile stores hit 32 different banks (2-way on stores)
A_ROW, B_ROW = BM + PAD, BN + PAD  # (constants: Numba sizes shared arrays from literals)


@functools.cache
def _device_functions(T, tensor_cores: bool):
    """What every kernel of this module does per thread, on CUDA cores or TF32 tensor cores."""
    @cuda.jit(device=True, inline=True)
    def as_loaded(value):
        return value

    # what a tile holds of a loaded value: rounded to TF32 for the tensor cores
    operand = tf32_round if tensor_cores else as_loaded

    @cuda.jit(device=True, inline=True)
    def place(i, j, tid):
        """(row, column) within the 64 x 64 tile of accumulator [i, j] of thread tid.  CUDA
        cores: rows ty + 16 i, columns tx + 16 j.  Tensor cores: warp w computes rows
        32 (w // 4) .. + 32 and columns 16 (w % 4) .. + 16 as 2 x 2 m16n8 products,
        acc[2 mi + ni, q] being element q of product (mi, ni)'s D fragment."""
        if tensor_cores:
            warp, lane = tid // 32, tid % 32
            row = (warp // 4) * 32 + (i // 2) * 16 + lane // 4 + (j // 2) * 8
            column = (warp % 4) * 16 + (i % 2) * 8 + (lane % 4) * 2 + j % 2
            return row, column
        return tid // TS + TS * i, tid % TS + TS * j

    @cuda.jit(device=True, inline=True)
    def gather(x, r, n, h, w, rows, height, width, stride_n, stride_c):
        """cols[r, p] of the image batch x (flat), pixel p = (n, h, w): zero outside."""
        value = T(0)
        if r < rows:
            c = r // 9
            tap = r - c * 9
            hh = h + tap // 3 - 1
            ww = w + tap % 3 - 1
            if 0 <= hh < height and 0 <= ww < width:
                value = x[n * stride_n + c * stride_c + hh * width + ww]
        return value

    @cuda.jit(device=True, inline=True)
    def multiply_cuda_cores(a_tile, b_tile, buffer, acc, tid):
        """acc[i, j] += sum_kk a_tile[buffer, kk, ty + 16 i] * b_tile[buffer, kk, tx + 16 j]."""
        tx, ty = tid % TS, tid // TS
        a = cuda.local.array(4, T)
        b = cuda.local.array(4, T)
        for kk in range(BK):
            for i in range(4):
                a[i] = a_tile[buffer, kk, ty + TS * i]
            for j in range(4):
                b[j] = b_tile[buffer, kk, tx + TS * j]
            for i in range(4):
                for j in range(4):
                    acc[i, j] += a[i] * b[j]

    @cuda.jit(device=True, inline=True)
    def multiply_tensor_cores(a_tile, b_tile, buffer, acc, tid):
        """The same sums as 2 x 2 warp products m16n8k8 (BK = 8: one step of k), A[m, k] =
        a_tile[buffer, k, m] and B[k, n] = b_tile[buffer, k, n] in mma_tf32's fragments."""
        warp, lane = tid // 32, tid % 32
        g, t = lane // 4, lane % 4
        a = cuda.local.array((2, 4), T)
        b = cuda.local.array((2, 2), T)
        for mi in range(2):
            m = (warp // 4) * 32 + mi * 16 + g
            a[mi, 0] = a_tile[buffer, t, m]
            a[mi, 1] = a_tile[buffer, t, m + 8]
            a[mi, 2] = a_tile[buffer, t + 4, m]
            a[mi, 3] = a_tile[buffer, t + 4, m + 8]
        for ni in range(2):
            n = (warp % 4) * 16 + ni * 8 + g
            b[ni, 0] = b_tile[buffer, t, n]
            b[ni, 1] = b_tile[buffer, t + 4, n]
        for mi in range(2):
            for ni in range(2):
                i = 2 * mi + ni
                d = mma_tf32(a[mi, 0], a[mi, 1], a[mi, 2], a[mi, 3], b[ni, 0], b[ni, 1],
                             acc[i, 0], acc[i, 1], acc[i, 2], acc[i, 3])
                acc[i, 0], acc[i, 1], acc[i, 2], acc[i, 3] = d[0], d[1], d[2], d[3]

    @cuda.jit(device=True, inline=True)
    def cleared(acc):
        """acc (4 x 4) set to zero."""
        for i in range(4):
            for j in range(4):
                acc[i, j] = T(0)

    multiply_step = multiply_tensor_cores if tensor_cores else multiply_cuda_cores
    return SimpleNamespace(operand=operand, place=place, gather=gather, cleared=cleared, multiply_step=multiply_step)


@per_dtype
def _forward_kernel(T, tensor_cores: bool, activation):
    """conv_forward, its epilogue applying ``activation`` (None: none)."""
    f = _device_functions(T, tensor_cores)
    operand, place, gather, cleared, multiply_step = f.operand, f.place, f.gather, f.cleared, f.multiply_step
    act = activations.activation(activation, T)
    value, per_channel = act.value, act.per_channel

    @cuda.jit(device=True)
    def store(v, i, j, tid, p0, m0, bias, slopes, y, z, rows_out, pixels, plane, a, has_bias, keep_z):
        """y (and z) at accumulator [i, j]'s output channel and pixel: act(value + bias)."""
        row, column = place(i, j, tid)
        p = p0 + column
        m = m0 + row
        if p < pixels and m < rows_out:
            if has_bias:
                v += bias[m]
            n = p // plane
            out = (n * rows_out + m) * plane + (p - n * plane)
            if keep_z:
                z[out] = v
            y[out] = value(v, slopes[m] if per_channel else a)

    @kernel_named(f"conv_forward_{activation or 'identity'}")
    def conv_forward(x, wmat, bias, slopes, y, z, rows_out, rows, pixels, height, width, stride_n, stride_c,
                     a, has_bias, keep_z, flipped):
        # x flat, read as x[n * stride_n + c * stride_c + h * W + w]; wmat (rows_out * rows,)
        # row-major, or with flipped the (rows // 9, rows_out, 3, 3) weight whose wflip it
        # stands for; y, z (N * rows_out * H * W,) NCHW; bias, slopes (rows_out,).
        # grid (ceil(pixels / BN), ceil(rows_out / BM)), block (TS, TS)
        a_tile = cuda.shared.array((2, BK, A_ROW), T)  # a_tile[., kk, m] = wmat[m0 + m, r0 + kk]
        b_tile = cuda.shared.array((2, BK, B_ROW), T)  # b_tile[., kk, q] = cols[r0 + kk, p0 + q]
        acc = cuda.local.array((4, 4), T)
        a_next = cuda.local.array(2, T)
        b_next = cuda.local.array(2, T)
        tid = cuda.threadIdx.y * TS + cuda.threadIdx.x
        p0, m0 = cuda.blockIdx.x * BN, cuda.blockIdx.y * BM
        plane = height * width
        cleared(acc)
        # this thread's loads: weights (m0 + tid // 8 (+ 32), r0 + tid % 8), and the column
        # values (r0 + tid // 64 (+ 4), p0 + tid % 64): its pixel is the same at every step
        a_m, a_k = tid // BK, tid % BK
        b_k, b_q = tid // BN, tid % BN
        p = p0 + b_q
        n = p // plane
        q = p - n * plane
        h, w = q // width, q % width
        if p >= pixels:
            n = -1  # gather reads nothing for it
        steps = (rows + BK - 1) // BK
        for s in range(steps + 1):
            # load step s (into registers), multiply step s - 1, then store step s
            if s < steps:
                r = s * BK + a_k
                for half in range(2):
                    m = m0 + a_m + half * (THREADS // BK)
                    if m < rows_out and r < rows:
                        # wflip[m, r] = weight[r // 9, m, 8 - r % 9] (the taps reversed)
                        at = ((r // 9) * rows_out + m) * 9 + 8 - r % 9 if flipped else m * rows + r
                        a_next[half] = wmat[at]
                    else:
                        a_next[half] = T(0)
                for half in range(2):
                    r = s * BK + b_k + half * (THREADS // BN)
                    b_next[half] = gather(x, r, n, h, w, rows, height, width, stride_n, stride_c) if n >= 0 else T(0)
            if s > 0:
                multiply_step(a_tile, b_tile, (s - 1) % 2, acc, tid)
            if s < steps:
                buffer = s % 2
                for half in range(2):
                    a_tile[buffer, a_k, a_m + half * (THREADS // BK)] = operand(a_next[half])
                    b_tile[buffer, b_k + half * (THREADS // BN), b_q] = operand(b_next[half])
            cuda.syncthreads()
        # epilogue: bias, activation, NCHW stores (a warp writes 16 consecutive pixels), one
        # call per accumulator with constant indices: acc stays in registers (a loop over it
        # with the activation inside is not unrolled, and acc would live in local memory)
        args = (tid, p0, m0, bias, slopes, y, z, rows_out, pixels, plane, a, has_bias, keep_z)
        store(acc[0, 0], 0, 0, *args)
        store(acc[0, 1], 0, 1, *args)
        store(acc[0, 2], 0, 2, *args)
        store(acc[0, 3], 0, 3, *args)
        store(acc[1, 0], 1, 0, *args)
        store(acc[1, 1], 1, 1, *args)
        store(acc[1, 2], 1, 2, *args)
        store(acc[1, 3], 1, 3, *args)
        store(acc[2, 0], 2, 0, *args)
        store(acc[2, 1], 2, 1, *args)
        store(acc[2, 2], 2, 2, *args)
        store(acc[2, 3], 2, 3, *args)
        store(acc[3, 0], 3, 0, *args)
        store(acc[3, 1], 3, 1, *args)
        store(acc[3, 2], 3, 2, *args)
        store(acc[3, 3], 3, 3, *args)

    return conv_forward


@per_dtype
def _grad_weight_kernels(T, tensor_cores: bool):
    f = _device_functions(T, tensor_cores)
    operand, place, gather, cleared, multiply_step = f.operand, f.place, f.gather, f.cleared, f.multiply_step

    @cuda.jit
    def conv_grad_weight(g, x, partial, outputs, rows, pixels, height, width, stride_n, stride_c, chunk):
        # g (outputs * pixels,) channels-first; x flat as in conv_forward; partial
        # (splits * outputs * rows,): split s's sum over pixels [s * chunk, (s+1) * chunk).
        # grid (ceil(rows / BN), ceil(outputs / BM), splits), block (TS, TS)
        a_tile = cuda.shared.array((2, BK, A_ROW), T)  # a_tile[., kk, m] = g[m0 + m, p + kk]
        b_tile = cuda.shared.array((2, BK, B_ROW), T)  # b_tile[., kk, q] = cols[r0 + q, p + kk]
        acc = cuda.local.array((4, 4), T)
        a_next = cuda.local.array(2, T)
        b_next = cuda.local.array(2, T)
        tid = cuda.threadIdx.y * TS + cuda.threadIdx.x
        r0, m0 = cuda.blockIdx.x * BN, cuda.blockIdx.y * BM
        start = cuda.blockIdx.z * chunk
        end = min(start + chunk, pixels)
        plane = height * width
        cleared(acc)
        a_m, a_k = tid // BK, tid % BK   # g[m0 + a_m (+ 32), p + a_k]
        b_q, b_k = tid // BK, tid % BK   # cols[r0 + b_q (+ 32), p + b_k]
        steps = max(0, (end - start + BK - 1) // BK)
        for s in range(steps + 1):
            if s < steps:
                p = start + s * BK + a_k
                for half in range(2):
                    m = m0 + a_m + half * (THREADS // BK)
                    a_next[half] = g[m * pixels + p] if m < outputs and p < end else T(0)
                if p < end:
                    n = p // plane
                    q = p - n * plane
                    h, w = q // width, q % width
                    for half in range(2):
                        b_next[half] = gather(x, r0 + b_q + half * (THREADS // BK), n, h, w, rows, height, width,
                                           stride_n, stride_c)
                else:
                    for half in range(2):
                        b_next[half] = T(0)
            if s > 0:
                multiply_step(a_tile, b_tile, (s - 1) % 2, acc, tid)
            if s < steps:
                buffer = s % 2
                for half in range(2):
                    a_tile[buffer, a_k, a_m + half * (THREADS // BK)] = operand(a_next[half])
                    b_tile[buffer, b_k, b_q + half * (THREADS // BK)] = operand(b_next[half])
            cuda.syncthreads()
        base = cuda.blockIdx.z * outputs * rows
        for i in range(4):
            for j in range(4):
                row, column = place(i, j, tid)
                m, r = m0 + row, r0 + column
                if m < outputs and r < rows:
                    partial[base + m * rows + r] = acc[i, j]

    @cuda.jit
    def sum_splits(partial, out, splits, size):
        # out (size,) = sum over s of partial[s * size + e], s in order
        e = cuda.grid(1)
        if e < size:
            total = T(0)
            for s in range(splits):
                total += partial[s * size + e]
            out[e] = total

    return SimpleNamespace(conv_grad_weight=conv_grad_weight, sum_splits=sum_splits)


def _on_tensor_cores(dtype, tensor_cores: bool) -> bool:
    """Whether dtype's kernels run on TF32 tensor cores: when asked and dtype is float32
    (float64 always runs exactly, on CUDA cores, as PyTorch's allow_tf32 leaves float64 alone)."""
    if tensor_cores and np.dtype(dtype) == np.float32:
        tensor_core_ops.check_device()
        return True
    return False


def _i(v):
    return np.int64(v)


def _flat(a):
    return a.reshape(-1)


def forward(x, wmat, y, bias=None, slopes=None, z=None, activation=None, slope=0.01, alpha=1.0,
            channels_first_input: bool = False, tensor_cores: bool = False, flipped: bool = False) -> None:
    """y (N, M, H, W) = act(wmat (M, R) @ cols(x) + bias), R = 9 * (x's channels); z gets
    the pre-activation when it is not None.  x is (N, C, H, W), or with
    ``channels_first_input`` the (C, N*H*W) layout of a channels-first gradient (its
    channel count and image shape are y's).  With ``flipped``, wmat is a conv weight
    (C, M, 3, 3) and the product uses its wflip (M, C*9), taps reversed: grad_x of the conv
    whose output gradient x is.  ``tensor_cores``: float32 on TF32 tensor cores."""
    n, m_out, h, w = y.shape
    plane = h * w
    if channels_first_input:
        channels = x.shape[0]
        stride_n, stride_c = plane, n * plane
    else:
        channels = x.shape[1]
        stride_n, stride_c = channels * plane, plane
    rows, pixels = channels * 9, n * plane
    # stands for an absent array (never read or written); a view of an input, not of y: the
    # simulator copies every argument back after the kernel, and a stale view of y would
    # overwrite what the kernel wrote
    unused = _flat(wmat)[:1]
    grid = (-(-pixels // BN), -(-m_out // BM))
    activations.check_slopes(activation, slopes, "conv3x3_act")
    kernel = _forward_kernel(y.dtype, _on_tensor_cores(y.dtype, tensor_cores), activation)
    launch(kernel, grid, (TS, TS), y, _flat(x), _flat(wmat),
           bias if bias is not None else unused, slopes if slopes is not None else unused, _flat(y),
           _flat(z) if z is not None else unused, _i(m_out), _i(rows), _i(pixels), _i(h), _i(w), _i(stride_n),
           _i(stride_c), activations.scalar(activation, y.dtype, slope, alpha), np.uint8(bias is not None),
           np.uint8(z is not None), np.uint8(flipped))


def splits_for(outputs: int, rows: int, pixels: int, blocks_wanted: int = 264) -> int:
    """How many pieces grad_weight's sum over pixels is cut into: enough blocks for a large
    GPU (264 = 2 per SM of an H100), pieces of at least 256 pixels."""
    tiles = -(-outputs // BM) * -(-rows // BN)
    return max(1, min(MAX_SPLITS, -(-blocks_wanted // tiles), -(-pixels // 256)))


def grad_weight(g, x, grad_w, xp, splits: int | None = None, tensor_cores: bool = False) -> None:
    """grad_w (K, C, 3, 3) = g (K, N*H*W) @ cols(x).T; x (N, C, H, W).  ``splits``: how
    many pieces the sum over pixels is cut into (default ``splits_for``); ``tensor_cores`` as
    in ``forward``."""
    n, c, h, w = x.shape
    k = g.shape[0]
    rows, pixels = c * 9, n * h * w
    if grad_w.size == 0:
        return
    splits = splits_for(k, rows, pixels) if splits is None else max(1, min(int(splits), pixels))
    chunk = -(-pixels // splits)
    chunk = -(-chunk // BK) * BK
    splits = -(-pixels // chunk)
    kernels = _grad_weight_kernels(x.dtype, _on_tensor_cores(x.dtype, tensor_cores))
    out = _flat(grad_w)
    partial = out if splits == 1 else xp.empty((splits * k * rows,), dtype=x.dtype)
    grid = (-(-rows // BN), -(-k // BM), splits)
    launch(kernels.conv_grad_weight, grid, (TS, TS), x, _flat(g), _flat(x), partial, _i(k), _i(rows), _i(pixels),
           _i(h), _i(w), _i(c * h * w), _i(h * w), _i(chunk))
    if splits > 1:
        size = k * rows
        launch(kernels.sum_splits, (-(-size // 256),), (256,), x, partial, out, _i(splits), _i(size))
