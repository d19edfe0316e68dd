"""Softmax cross-entropy, the rules of ``pycnn.ops.loss``: logits (N, C), labels (N,)
integers, class weights w (C,) (1 where absent), label smoothing eps.  Per row i:

  lse_i = m_i + log sum_c exp(z_ic - m_i),   m_i = max_c z_ic
  A_ic  = (eps / C + (1 - eps) [c == y_i]) * w_c
  row_i = sum_c A_ic (lse_i - z_ic)
        = (1 - eps) w_{y_i} (lse_i - z_{y_i}) + (eps / C) sum_c w_c (lse_i - z_ic)
  loss  = sum_i row_i / W,   W = sum_i w_{y_i}                    (N without weights)
  d loss / d z_ic = (exp(z_ic - lse_i) sum_c A_ic - A_ic) / W,
                    sum_c A_ic = (eps / C) sum_c w_c + (1 - eps) w_{y_i}

``forward``: ONE block; thread t takes rows t, t + threads, ... (max, sum of exp, the
weighted terms: three passes over the row's C values, which stay in L1), keeps lse_i for
backward, and the block tree-sums (sum row_i, W, sum_c w_c) in a fixed order: one launch,
deterministic.  (A classifier head's N x C is small next to any convolution; for wide heads,
C in the thousands, a warp per row would be the next step.)
``backward``: one thread per logit, from the saved lse_i.

Labels are checked on the device, so a training step needs no host synchronisation: a
label outside [0, C) makes its row's loss term and its gradient row NaN (never a silent
wrong answer) and records itself in a per-device error buffer (the first one, by
compare-and-swap: flag, label, row, C).  ``raise_label_errors`` reads that buffer, only when a
loss kernel ran since its last reading, and raises one ValueError naming ``labels``; pycnn
calls it where data is read on the host anyway (``pycnn.device.to_host``, so
``loss.item()``), after the copy has synchronised the stream.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from ._launch import array_module, config_1d, launch, per_dtype
from .reduce import REDUCE_THREADS, block_sums


@per_dtype
def _build(T):
    @cuda.jit(device=True)
    def bad_label(label, row, classes, error):
        """Record the first bad label of this device (flag, label, row, C)."""
        if cuda.atomic.compare_and_swap(error, 0, 1) == 0:
            error[1], error[2], error[3] = label, row, classes

    @cuda.jit
    def forward(logits, labels, weight, loss, lse, stats, error, rows, classes, smoothing, weighted):
        # logits is (N*C,) row-major, labels (N,), weight (C,) (read when weighted), lse (N,);
        # loss (1,) = sum row_i / W; stats (2,) = (W, sum_c w_c); error (4,) int64
        # grid (1,), REDUCE_THREADS threads
        shared = cuda.shared.array((3, REDUCE_THREADS), T)
        sums = cuda.local.array(3, T)  # sum row_i, W, sum_c w_c
        tid, threads = cuda.threadIdx.x, cuda.blockDim.x
        sums[0], sums[1], sums[2] = T(0), T(0), T(0)
        for c in range(tid, classes, threads):
            sums[2] += weight[c] if weighted else T(1)
        keep = T(1) - smoothing
        spread = smoothing / T(classes)
        for i in range(tid, rows, threads):
            row = i * classes
            m = logits[row]
            for c in range(1, classes):
                v = logits[row + c]
                if v > m or v != v:  # NaN wins, as max() in the reference
                    m = v
            s = T(0)
            for c in range(classes):
                s += T(math.exp(logits[row + c] - m))
            log_s = T(math.log(s))
            lse[i] = m + log_s
            label = labels[i]
            if label < 0 or label >= classes:
                bad_label(label, i, classes, error)
                sums[0] += T(math.nan)
                continue
            w_y = weight[label] if weighted else T(1)
            term = keep * w_y * ((m - logits[row + label]) + log_s)  # lse - z as (m - z) + log s
            if smoothing > T(0):
                spread_sum = T(0)
                for c in range(classes):
                    spread_sum += (weight[c] if weighted else T(1)) * ((m - logits[row + c]) + log_s)
                term += spread * spread_sum
            sums[0] += term
            sums[1] += w_y
        block_sums(shared, sums, 3)
        if tid == 0:
            loss[0] = shared[0, 0] / shared[1, 0]
            stats[0], stats[1] = shared[1, 0], shared[2, 0]

    @cuda.jit
    def backward(logits, labels, weight, lse, stats, grad, grad_logits, rows, classes, smoothing, weighted):
        # grad_logits is (N*C,) like logits, grad (1,) the loss's gradient; one thread per logit
        j = cuda.grid(1)
        if j < rows * classes:
            i, c = j // classes, j % classes
            label = labels[i]
            if label < 0 or label >= classes:
                grad_logits[j] = T(math.nan)
                return
            keep = (T(1) - smoothing) * (weight[label] if weighted else T(1))
            spread = smoothing / T(classes)
            total = spread * stats[1] + keep  # sum_c A_ic
            a = spread * (weight[c] if weighted else T(1)) + (keep if c == label else T(0))
            p = T(math.exp(logits[j] - lse[i]))
            grad_logits[j] = (p * total - a) * (grad[0] / stats[0])

    return SimpleNamespace(forward=forward, backward=backward)


# ------------------------------------------------------------------- the label check

_errors: dict = {}     # device -> (4,) int64 error buffer: (flag, label, row, C), zero while all is well
_unread: set = set()   # devices whose buffer a loss kernel may have written since it was last read


def _error_key(like):
    return "host" if array_module(like) is np else like.device.id


def _error_buffer(like):
    key = _error_key(like)
    buffer = _errors.get(key)
    if buffer is None:
        buffer = _errors[key] = array_module(like).zeros((4,), dtype=np.int64)
    _unread.add(key)
    return buffer


def replayed(like) -> None:
    """A loss kernel on like's device ran again without its Python (a CUDA graph replay):
    its error buffer is read at the next ``raise_label_errors``."""
    _unread.add(_error_key(like))


def raise_label_errors() -> None:
    """Raise the first bad label a loss kernel found since the last call, once (ValueError
    naming ``labels``).  Reads a device's 32-byte buffer only where a loss kernel ran since:
    call it where the host has synchronised anyway."""
    while _unread:
        buffer = _errors[_unread.pop()]
        flag, label, row, classes = (int(v) for v in (buffer.get() if hasattr(buffer, "get") else buffer))
        if flag:
            buffer[...] = 0  # reported once
            raise ValueError(f"softmax_cross_entropy: labels must lie in [0, {classes}), got {label} at row {row} "
                             "(found on the device by an earlier call, whose loss and gradient are NaN)")


# ----------------------------------------------------------------------------- public API

def _weights(logits, class_weight):
    """(weight array or a stand-in, weighted flag) in the dtype of logits."""
    if class_weight is None:
        return logits.reshape(-1)[:1], np.uint8(0)
    return class_weight.astype(logits.dtype, copy=False), np.uint8(1)


def softmax_ce_forward(logits, labels, class_weight, smoothing, loss, lse, stats) -> None:
    """loss (0-d) of logits (N, C) (C-contiguous); lse (N,) and stats (2,) are kept for
    backward."""
    rows, classes = logits.shape
    weight, weighted = _weights(logits, class_weight)
    flat = logits.reshape(-1)
    launch(_build(logits.dtype).forward, (1,), (REDUCE_THREADS,), flat, flat, labels, weight, loss.reshape(1), lse,
           stats, _error_buffer(logits), np.int64(rows), np.int64(classes), logits.dtype.type(smoothing), weighted)


def softmax_ce_backward(logits, labels, class_weight, smoothing, lse, stats, grad, grad_logits) -> None:
    """grad_logits (N, C) = d loss / d logits * grad (a 0-d array)."""
    rows, classes = logits.shape
    weight, weighted = _weights(logits, class_weight)
    grid, block = config_1d(logits.size)
    launch(_build(logits.dtype).backward, grid, block, logits, logits.reshape(-1), labels, weight, lse, stats,
           grad.reshape(1), grad_logits.reshape(-1), np.int64(rows), np.int64(classes), logits.dtype.type(smoothing),
           weighted)
