"""Batch normalisation, the rules of ``pycnn.ops.norm``: statistics per channel over N (and
H, W), the biased variance to normalise, the unbiased one for the running variance; with an
activation applied in the same pass (batchnorm_act: the device functions of ``activations``,
the kernels compiled per activation; None, the identity, is plain batch norm, so the two ops
share every kernel).

x is viewed as (N, C, P) (P = H*W, or 1 for (N, C) input) and passed flat; M = N*P values
per channel.

Statistics (numerically stable and deterministic: no E[x^2] - E[x]^2, no atomic sums):
  ``moments``   grid (S, C): block (s, c) runs Welford's update over a grid-stride share
                of channel c, merges its threads with Chan's formula, writes
                (count, mean, M2) to partial[c, s]; the last block of channel c to finish
                (a fence, then a ticket: ``last_block``) merges the S partials (strided,
                then a tree: a fixed order, whichever block is last), writes mean and
                1/sqrt(var + eps), and updates the running statistics in place.
Forward, one pass (``apply``):
  x_hat = (x - mean) * inv_std,  z = x_hat * gamma + beta,  y = act(z)
Backward: nothing but x is kept; x_hat and z are recomputed from it (the same device function
as forward: the same z, bit for bit), so the activation's gradient needs neither y nor z in
memory, and no host-side choice between them.  With gz = act'(z) * grad:
  ``grad_sums``     grid (S, C): partial sums of gz, gz * x_hat (and for prelu, of grad * z
                    where z <= 0: the slope's gradient); the last block of each channel
                    adds them (a fixed order): grad_beta[c] = sum gz, grad_gamma[c] =
                    sum gz * x_hat, grad_slopes[c];
  ``grad_x``        grad_x = gamma * inv_std * (gz - grad_beta / M - x_hat * grad_gamma / M)
                    (training), or gz * gamma * inv_std (evaluation).
Launches: forward 2 (``stats``: moments; ``apply``), backward 2 (``backward``: grad_sums, grad_x).  The
tickets are int32 zeros kept per device and stream, reset by each launch's last blocks.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from . import activations
from ._launch import THREADS_1D, kernel_named, launch, per_dtype
from .reduce import REDUCE_THREADS, block_sums

ELEMENTS_PER_THREAD = 8  # values per thread of the reduction grids
MAX_BLOCKS = 1024  # reduction blocks per channel


@cuda.jit(device=True)
def last_block(flag, tickets, c, blocks):
    """Whether this block is the last of channel c's ``blocks`` to finish (the answer to
    every thread): its partial result, written before, is published by a fence, then a
    ticket is taken.  The last block sees every block's partial and resets the ticket
    for the next launch."""
    if cuda.threadIdx.x == 0:
        cuda.threadfence()
        flag[0] = 1 if cuda.atomic.add(tickets, c, 1) == blocks - 1 else 0
        if flag[0] == 1:
            tickets[c] = 0
    cuda.syncthreads()
    return flag[0] == 1


@per_dtype
def _build(T):
    @cuda.jit(device=True)
    def merge(shared, tid, other):
        """Chan's merge of the (count, mean, M2) triples of threads tid and other, into tid."""
        na, nb = shared[0, tid], shared[0, other]
        if nb > T(0):
            n = na + nb
            delta = shared[1, other] - shared[1, tid]
            shared[1, tid] += delta * (nb / n)
            shared[2, tid] += shared[2, other] + delta * delta * (na * nb / n)
            shared[0, tid] = n

    @cuda.jit(device=True)
    def merge_block(shared, tid, n, mean, m2):
        """Store this thread's triple, then tree-merge the block's into shared[:, 0]."""
        shared[0, tid], shared[1, tid], shared[2, tid] = n, mean, m2
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                merge(shared, tid, tid + stride)
            cuda.syncthreads()
            stride //= 2

    @cuda.jit
    def moments(x, partial, tickets, mean_out, inv_std_out, running_mean, running_var, update_running, momentum,
                eps, channels, inner, count):
        # x is (N*C*P,), partial is (C*S*3,), tickets (>= C,) int32 zeros; mean_out,
        # inv_std_out, running_* are (C,); grid (S, C), REDUCE_THREADS threads
        shared = cuda.shared.array((3, REDUCE_THREADS), T)
        flag = cuda.shared.array(1, np.int32)
        c, s, blocks = cuda.blockIdx.y, cuda.blockIdx.x, cuda.gridDim.x
        tid = cuda.threadIdx.x
        n, mean, m2 = T(0), T(0), T(0)
        e = s * cuda.blockDim.x + tid
        while e < count:
            v = x[((e // inner) * channels + c) * inner + e % inner]
            n += T(1)
            delta = v - mean
            mean += delta / n
            m2 += delta * (v - mean)
            e += blocks * cuda.blockDim.x
        merge_block(shared, tid, n, mean, m2)
        if tid == 0:
            out = (c * blocks + s) * 3
            partial[out], partial[out + 1], partial[out + 2] = shared[0, 0], shared[1, 0], shared[2, 0]
        if not last_block(flag, tickets, c, blocks):
            return
        # the last block merges the S partials of channel c: each thread those of tid,
        # tid + threads, ... in order, then the block its threads (Chan), as above
        n, mean, m2 = T(0), T(0), T(0)
        for b in range(tid, blocks, cuda.blockDim.x):
            at = (c * blocks + b) * 3
            nb = partial[at]
            if nb > T(0):
                total = n + nb
                delta = partial[at + 1] - mean
                mean += delta * (nb / total)
                m2 += partial[at + 2] + delta * delta * (n * nb / total)
                n = total
        merge_block(shared, tid, n, mean, m2)
        if tid == 0:
            mean, m2 = shared[1, 0], shared[2, 0]
            var = m2 / T(count)
            mean_out[c] = mean
            inv_std_out[c] = T(1) / T(math.sqrt(var + eps))
            if update_running:
                keep = T(1) - momentum
                running_mean[c] = keep * running_mean[c] + momentum * mean
                running_var[c] = keep * running_var[c] + momentum * (m2 / T(count - 1))

    return SimpleNamespace(moments=moments)


@per_dtype
def _build_activation(T, activation):
    """The kernels that normalise and apply ``activation`` (None: none), and their gradients."""
    act = activations.activation(activation, T)
    value, grad, weight_grad, per_channel = act.value, act.grad, act.weight_grad, act.per_channel
    name = activation or "identity"

    @cuda.jit(device=True)
    def affine(v, m, scale, g, b):
        """(x_hat, z) of one value: forward and backward compute z alike."""
        x_hat = (v - m) * scale
        return x_hat, x_hat * g + b

    @kernel_named(f"apply_{name}")
    def apply(x, mean, inv_std, gamma, beta, slopes, y, channels, inner, size, a):
        # x and y are (N*C*P,); mean, inv_std, gamma, beta, slopes (prelu's; else not read)
        # are (C,); 1-D grid over x
        i = cuda.grid(1)
        if i < size:
            c = (i // inner) % channels
            _, z = affine(x[i], mean[c], inv_std[c], gamma[c], beta[c])
            y[i] = value(z, slopes[c] if per_channel else a)

    @kernel_named(f"grad_sums_{name}")
    def grad_sums(x, grad_y, mean, inv_std, gamma, beta, slopes, partial, tickets, grad_beta, grad_gamma, grad_slopes,
                  want_slopes, channels, inner, count, a):
        # partial is (C*S*3,): sums of gz, gz * x_hat and (prelu) grad * z where z <= 0;
        # tickets (>= C,) int32 zeros; grad_beta, grad_gamma, grad_slopes (written when
        # want_slopes) are (C,); grid (S, C), REDUCE_THREADS threads
        shared = cuda.shared.array((3, REDUCE_THREADS), T)
        flag = cuda.shared.array(1, np.int32)
        sums = cuda.local.array(3, T)
        c, s, blocks = cuda.blockIdx.y, cuda.blockIdx.x, cuda.gridDim.x
        m, scale, g_c, b_c = mean[c], inv_std[c], gamma[c], beta[c]
        a_c = slopes[c] if per_channel else a
        sums[0], sums[1], sums[2] = T(0), T(0), T(0)
        e = s * cuda.blockDim.x + cuda.threadIdx.x
        while e < count:
            at = ((e // inner) * channels + c) * inner + e % inner
            g = grad_y[at]
            x_hat, z = affine(x[at], m, scale, g_c, b_c)
            gz = grad(z, g, a_c)
            sums[0] += gz
            sums[1] += gz * x_hat
            if per_channel:
                sums[2] += weight_grad(z, g)
            e += blocks * cuda.blockDim.x
        block_sums(shared, sums, 3)  # a constant count: sums stays in registers
        if cuda.threadIdx.x == 0:
            out = (c * blocks + s) * 3
            partial[out], partial[out + 1], partial[out + 2] = shared[0, 0], shared[1, 0], shared[2, 0]
        if not last_block(flag, tickets, c, blocks):
            return
        # the last block adds the S partials of channel c: strided, then a tree (a fixed order)
        sums[0], sums[1], sums[2] = T(0), T(0), T(0)
        for b in range(cuda.threadIdx.x, blocks, cuda.blockDim.x):
            at = (c * blocks + b) * 3
            sums[0] += partial[at]
            sums[1] += partial[at + 1]
            sums[2] += partial[at + 2]
        block_sums(shared, sums, 3)
        if cuda.threadIdx.x == 0:
            grad_beta[c], grad_gamma[c] = shared[0, 0], shared[1, 0]
            if want_slopes:
                grad_slopes[c] = shared[2, 0]

    @kernel_named(f"grad_x_{name}")
    def grad_x(x, grad_y, mean, inv_std, gamma, beta, slopes, grad_beta, grad_gamma, out, channels, inner,
               size, count, training, a):
        # x, grad_y and out (grad_x) are (N*C*P,); the rest (C,); 1-D grid over x
        i = cuda.grid(1)
        if i < size:
            c = (i // inner) % channels
            x_hat, z = affine(x[i], mean[c], inv_std[c], gamma[c], beta[c])
            gz = grad(z, grad_y[i], slopes[c] if per_channel else a)
            if training:
                gz = gz - (grad_beta[c] + x_hat * grad_gamma[c]) / T(count)
            out[i] = gamma[c] * inv_std[c] * gz

    return SimpleNamespace(apply=apply, grad_sums=grad_sums, grad_x=grad_x)


def _split(x):
    """(channels, inner, count per channel, S blocks per channel) of an (N, C[, H, W]) array:
    enough blocks that each thread reads about ELEMENTS_PER_THREAD values (memory latency is
    hidden by many loads in flight, not by long loops), at most MAX_BLOCKS per channel."""
    n, c = x.shape[0], x.shape[1]
    inner = x.size // (n * c)
    count = n * inner
    blocks = max(1, min(MAX_BLOCKS, -(-count // (REDUCE_THREADS * ELEMENTS_PER_THREAD))))
    return c, inner, count, blocks


_tickets: dict = {}  # (device, stream) -> int32 zeros, one per channel: the last-block tickets


def _tickets_for(x, channels, xp):
    """The ticket counters of the reductions on x's device and the current stream (zero
    between launches: each launch's last block resets its channel's)."""
    key = "host" if xp is np else (x.device.id, xp.cuda.get_current_stream().ptr)
    tickets = _tickets.get(key)
    if tickets is None or tickets.size < channels:
        tickets = _tickets[key] = xp.zeros((max(channels, 256),), dtype=np.int32)
    return tickets


def stats(x, mean, inv_std, running_mean, running_var, momentum, eps, xp) -> None:
    """mean and inv_std (C,) of x in training; updates running_* (C,) in place when given.
    One launch: the last block of each channel merges its partials."""
    k = _build(x.dtype)
    channels, inner, count, blocks = _split(x)
    flat = x.reshape(-1)
    partial = xp.empty((channels * blocks * 3,), dtype=x.dtype)
    update = running_mean is not None
    # absent running statistics: a buffer of its own (a view of an output would be copied
    # back over it by the simulator, which copies every argument back)
    unused = xp.empty((1,), dtype=x.dtype)
    dtype = x.dtype.type
    launch(k.moments, (blocks, channels), (REDUCE_THREADS,), flat, flat, partial, _tickets_for(x, channels, xp), mean,
           inv_std, running_mean if update else unused, running_var if update else unused, np.uint8(update),
           dtype(momentum), dtype(eps), np.int64(channels), np.int64(inner), np.int64(count))


def _activation_args(x, slopes, activation, slope, alpha):
    """(slopes or a stand-in, a) as the kernels of ``activation`` take them."""
    activations.check_slopes(activation, slopes, "batchnorm")
    return (slopes if slopes is not None else x.reshape(-1)[:1]), activations.scalar(activation, x.dtype, slope, alpha)


def apply(x, mean, inv_std, gamma, beta, y, slopes=None, activation=None, slope=0.01, alpha=1.0) -> None:
    """y = act((x - mean) * inv_std * gamma + beta) (activation None: batch norm alone)."""
    channels, inner, _, _ = _split(x)
    stand_in, a = _activation_args(x, slopes, activation, slope, alpha)
    grid = (-(-x.size // THREADS_1D),)
    launch(_build_activation(x.dtype, activation).apply, grid, (THREADS_1D,), x, x.reshape(-1), mean, inv_std, gamma,
           beta, stand_in, y.reshape(-1), np.int64(channels), np.int64(inner), np.int64(x.size), a)


def backward(x, grad, mean, inv_std, gamma, beta, grad_x, grad_gamma, grad_beta, training, xp, slopes=None,
             grad_slopes=None, activation=None, slope=0.01, alpha=1.0) -> None:
    """grad_gamma, grad_beta (C,), grad_x (like x; None: not wanted) and, for prelu,
    grad_slopes (C,; None: not wanted) of y = act(batch norm of x)."""
    k = _build_activation(x.dtype, activation)
    channels, inner, count, blocks = _split(x)
    stand_in, a = _activation_args(x, slopes, activation, slope, alpha)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    if grad_slopes is not None and slopes is None:
        raise ValueError("batchnorm: grad_slopes is prelu's only")
    partial = xp.empty((channels * blocks * 3,), dtype=x.dtype)
    launch(k.grad_sums, (blocks, channels), (REDUCE_THREADS,), flat_x, flat_x, flat_g, mean, inv_std, gamma, beta,
           stand_in, partial, _tickets_for(x, channels, xp), grad_beta, grad_gamma,
           grad_slopes if grad_slopes is not None else xp.empty((1,), dtype=x.dtype), np.uint8(grad_slopes is not None),
           np.int64(channels), np.int64(inner), np.int64(count), a)
    if grad_x is not None:
        grid = (-(-x.size // THREADS_1D),)
        launch(k.grad_x, grid, (THREADS_1D,), flat_x, flat_x, flat_g, mean, inv_std, gamma, beta, stand_in,
               grad_beta, grad_gamma, grad_x.reshape(-1), np.int64(channels), np.int64(inner), np.int64(x.size),
               np.int64(count), np.uint8(training), a)
