"""Optimiser updates: one kernel per parameter, and multi-tensor kernels that update many
parameters (of any sizes, from several parameter groups) in one launch.

SGD with momentum, the rules of ``pycnn.optim.SGD`` (PyTorch's formulation), in place on
flat (size,) views of C-contiguous arrays:
    g = grad + weight_decay * w
    v = g (first step) or momentum * v + g
    w -= lr * (g + momentum * v)   if nesterov, else   w -= lr * v
and Adam with bias correction, the rules of ``pycnn.optim.Adam`` (weight decay as L2 on g):
    g = grad + weight_decay * w
    m = (1 - beta1) g (first step) or beta1 m + (1 - beta1) g;   v likewise with g^2, beta2
    w -= lr * (m / bias1) / (sqrt(v / bias2) + eps),   bias_k = 1 - beta_k^step (host)

Multi-tensor kernels (``sgd_multi_step``, ``adam_multi_step``, ``sum_squares_and_abs``)
take a fixed number of tensor *slots* as ordinary 1-D array parameters (like PyTorch's
``multi_tensor_apply``, whose tensor list also travels in the kernel's parameter space):
slot k's arrays, its own lr / weight decay / first-step flag (Adam: its bias corrections)
are arguments k of each list; unused slots get empty arrays.  Every thread walks every
slot with a grid-stride loop.  No pointer table lives on the device, so nothing is copied
to the GPU per step and the same code runs in Numba's simulator.  Inside a captured CUDA
graph the values that change from step to step (lr, Adam's bias corrections) are read from
a small table on the device instead (``live``, ``live_base``), which pycnn.cuda_graph
refreshes before each replay.  The slot counts keep the parameters under CUDA's 4 KB limit
in float64 (an array is 56 bytes under Numba's ABI; ptxas rejects a kernel over the limit,
and tests/test_cuda_ptx.py compiles every one).  Each element goes through the same device
function as in the per-parameter kernels, so both give the same numbers.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numba
import numpy as np
from numba import cuda

from ._launch import THREADS_1D, array_module, blocks_for, config_1d, empty_of, launch, live_args, per_dtype
from .reduce import REDUCE_THREADS, block_sum, reduce_blocks

# Tensor slots per launch.  Parameter bytes in float64, the live table (56) and its base (4)
# included: SGD+momentum 20 * (3 * 56 + 2 * 8 + 1) + 9 + 7 + 60 = 3,789; plain SGD 28 * (2 * 56
# + 2 * 8) + 60 = 3,644; Adam 15 * (4 * 56 + 4 * 8 + 1) + 24 + 60 = 3,940; sums 32 * 56 + 88 =
# 1,880 (all < 4,096: tests/test_cuda_ptx.py compiles each and checks).
SGD_SLOTS, SGD_PLAIN_SLOTS, ADAM_SLOTS, SUM_SLOTS = 20, 28, 15, 32
MAX_BLOCKS = 2048  # of a multi-tensor update; larger tensors loop (grid stride)


def _multi_kernel(name: str, slot_args: tuple, global_args: tuple, slots: int, call: str, prologue: str = ""):
    """A kernel ``name(<slot_args of slot 0..slots-1, list by list>, *global_args)`` whose
    body runs ``call`` once per slot, with ``{a}`` in it replaced by that slot's argument
    ``a``.  Generated as source (a kernel has a fixed parameter list); returns the plain
    Python function: the caller's closure supplies the device functions it names."""
    params = [f"{a}{k}" for a in slot_args for k in range(slots)] + list(global_args)
    lines = [f"def {name}({', '.join(params)}):"]
    lines += ["    " + line for line in prologue.strip().splitlines()]
    lines += ["    " + call.format(**{a: f"{a}{k}" for a in slot_args}, slot=k) for k in range(slots)]
    return "\n".join(lines)


def _compile_multi(source: str, name: str, closure: dict):
    """``cuda.jit`` of the generated ``source``, made inside a factory so that the names of
    ``closure`` are closure cells (the raw launch path keys its PTX cache by their values)."""
    free = ", ".join(closure)
    factory = f"def _factory({free}):\n" + "\n".join("    " + line for line in source.splitlines()) + \
        f"\n    return {name}\n"
    namespace = {"cuda": cuda, "__name__": __name__}
    exec(compile(factory, f"<pycnn.kernels.optim.{name}>", "exec"), namespace)  # noqa: S102 - our own text
    function = namespace["_factory"](*closure.values())
    function.__qualname__ = name
    return cuda.jit(function)


@per_dtype
def _build(T):
    # ------------------------------------------------------------- one element
    @cuda.jit(device=True)
    def sgd_momentum_at(w, grad, velocity, i, lr, momentum, weight_decay, nesterov, first):
        g = grad[i] + weight_decay * w[i]
        v = g if first else momentum * velocity[i] + g
        velocity[i] = v
        w[i] -= lr * (g + momentum * v if nesterov else v)

    @cuda.jit(device=True)
    def sgd_plain_at(w, grad, i, lr, weight_decay):
        w[i] -= lr * (grad[i] + weight_decay * w[i])

    @cuda.jit(device=True)
    def adam_at(w, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, bias1, bias2, first):
        g = grad[i] + weight_decay * w[i]
        mi = (T(1) - beta1) * g if first else beta1 * m[i] + (T(1) - beta1) * g
        vi = (T(1) - beta2) * g * g if first else beta2 * v[i] + (T(1) - beta2) * g * g
        m[i] = mi
        v[i] = vi
        w[i] -= lr * (mi / bias1) / (math.sqrt(vi / bias2) + eps)

    # ------------------------------------------------------- one parameter per launch
    @cuda.jit
    def sgd_momentum(w, grad, velocity, lr, momentum, weight_decay, nesterov, first):
        i = cuda.grid(1)
        if i < w.size:
            sgd_momentum_at(w, grad, velocity, i, lr, momentum, weight_decay, nesterov, first)

    @cuda.jit
    def sgd_plain(w, grad, lr, weight_decay):
        i = cuda.grid(1)
        if i < w.size:
            sgd_plain_at(w, grad, i, lr, weight_decay)

    @cuda.jit
    def adam(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2, first):
        i = cuda.grid(1)
        if i < w.size:
            adam_at(w, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, bias1, bias2, first)

    # ------------------------------------------------ one slot of a multi-tensor launch
    @cuda.jit(device=True)
    def sgd_momentum_slot(w, grad, velocity, lr, momentum, weight_decay, nesterov, first, start, stride):
        for i in range(start, w.size, stride):
            sgd_momentum_at(w, grad, velocity, i, lr, momentum, weight_decay, nesterov, first)

    @cuda.jit(device=True)
    def sgd_plain_slot(w, grad, lr, weight_decay, start, stride):
        for i in range(start, w.size, stride):
            sgd_plain_at(w, grad, i, lr, weight_decay)

    @cuda.jit(device=True)
    def adam_slot(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2, first, start, stride):
        for i in range(start, w.size, stride):
            adam_at(w, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, bias1, bias2, first)

    @cuda.jit(device=True)
    def sums_slot(w, out, slot, partial, start, stride):
        # out is (blocks, SUM_SLOTS, 2) float64: this block's sum of w^2 and of |w|
        squares = 0.0
        absolute = 0.0
        for i in range(start, w.size, stride):
            x = float(w[i])
            squares += x * x
            absolute += abs(x)
        squares = block_sum(partial, squares)
        absolute = block_sum(partial, absolute)
        if cuda.threadIdx.x == 0:
            out[cuda.blockIdx.x, slot, 0] = squares
            out[cuda.blockIdx.x, slot, 1] = absolute

    grid_stride = "start = cuda.grid(1)\nstride = cuda.gridsize(1)"
    # live / live_base: a captured step reads each slot's lr (Adam: lr, bias1, bias2) from
    # live[live_base + slot * width + j] (pycnn.cuda_graph refreshes them before each replay)
    lr_sgd = "({lr} if live_base < 0 else live[live_base + {slot}])"
    sgd_momentum_multi = _compile_multi(_multi_kernel(
        "sgd_momentum_multi", ("w", "g", "v", "lr", "wd", "first"), ("momentum", "nesterov", "live", "live_base"),
        SGD_SLOTS, f"_slot({{w}}, {{g}}, {{v}}, {lr_sgd}, momentum, {{wd}}, nesterov, {{first}}, start, stride)",
        grid_stride),
        "sgd_momentum_multi", {"_slot": sgd_momentum_slot})
    sgd_plain_multi = _compile_multi(_multi_kernel(
        "sgd_plain_multi", ("w", "g", "lr", "wd"), ("live", "live_base"), SGD_PLAIN_SLOTS,
        f"_slot({{w}}, {{g}}, {lr_sgd}, {{wd}}, start, stride)", grid_stride),
        "sgd_plain_multi", {"_slot": sgd_plain_slot})
    adam_live = ", ".join(f"({{{name}}} if live_base < 0 else live[live_base + {{slot}} * 3 + {j}])"
                          for j, name in enumerate(("lr", "bias1", "bias2")))
    lr_adam, bias1_adam, bias2_adam = adam_live.split(", ")
    adam_multi = _compile_multi(_multi_kernel(
        "adam_multi", ("w", "g", "m", "v", "lr", "wd", "bias1", "bias2", "first"),
        ("beta1", "beta2", "eps", "live", "live_base"), ADAM_SLOTS,
        f"_slot({{w}}, {{g}}, {{m}}, {{v}}, {lr_adam}, beta1, beta2, eps, {{wd}}, {bias1_adam}, {bias2_adam}, "
        "{first}, start, stride)", grid_stride),
        "adam_multi", {"_slot": adam_slot})
    sums_multi = _compile_multi(_multi_kernel(
        "sum_squares_abs_multi", ("w",), ("out",), SUM_SLOTS, "_slot({w}, out, {slot}, partial, start, stride)",
        grid_stride + "\npartial = cuda.shared.array(_threads, _f64)"),
        "sum_squares_abs_multi", {"_slot": sums_slot, "_threads": REDUCE_THREADS, "_f64": numba.float64})

    return SimpleNamespace(sgd_momentum=sgd_momentum, sgd_plain=sgd_plain, adam=adam,
                           sgd_momentum_multi=sgd_momentum_multi, sgd_plain_multi=sgd_plain_multi,
                           adam_multi=adam_multi, sums_multi=sums_multi)


# ------------------------------------------------------------- one parameter per launch

def sgd_step(w, grad, velocity, lr, momentum, weight_decay, nesterov, first) -> None:
    """One SGD step on the C-contiguous array w (in place; velocity too, or None without
    momentum)."""
    dtype = w.dtype.type
    flat_w, flat_g = w.reshape(-1), grad.reshape(-1)
    grid, block = config_1d(flat_w.size)
    kernels = _build(w.dtype)
    if velocity is None:
        launch(kernels.sgd_plain, grid, block, flat_w, flat_w, flat_g, dtype(lr), dtype(weight_decay))
    else:
        launch(kernels.sgd_momentum, grid, block, flat_w, flat_w, flat_g, velocity.reshape(-1), dtype(lr),
               dtype(momentum), dtype(weight_decay), np.uint8(nesterov), np.uint8(first))


def adam_step(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """Adam step number ``step`` (1, 2, ...) on the C-contiguous array w, in place; m and v
    are its moment arrays (read from step 2 on, written always)."""
    dtype = w.dtype.type
    flat_w = w.reshape(-1)
    grid, block = config_1d(flat_w.size)
    launch(_build(w.dtype).adam, grid, block, flat_w, flat_w, grad.reshape(-1), m.reshape(-1), v.reshape(-1),
           dtype(lr), dtype(beta1), dtype(beta2), dtype(eps), dtype(weight_decay), dtype(1 - beta1 ** step),
           dtype(1 - beta2 ** step), np.uint8(step == 1))


# ------------------------------------------------------------------ multi-tensor launches

def _chunks(entries):
    """entries (tuples whose first item is the parameter) split by dtype, in order."""
    by_dtype: dict = {}
    for entry in entries:
        by_dtype.setdefault(entry[0].dtype, []).append(entry)
    return by_dtype.items()


def _launch_slots(kernel, slots: int, lists, fillers, global_args, like, max_size: int, threads=THREADS_1D) -> None:
    """Launch ``kernel`` on up to ``slots`` tensors: ``lists`` holds one list per slot
    argument (each as long as the tensors), padded here with ``fillers``."""
    n = len(lists[0])
    args = []
    for values, filler in zip(lists, fillers):
        args += values
        args += [filler] * (slots - n)
    grid = (min(MAX_BLOCKS, blocks_for(max_size, threads)),)
    launch(kernel, grid, (threads,), like, *args, *global_args)


def _live_table(live, dtype, getters, width, like):
    """(table, base) kernel arguments: ``live(dtype, getters, width)`` registers one value
    row per getter in a captured step's table; without ``live``, an empty table and -1."""
    return live_args(None if live is None else live(dtype, getters, width), like, dtype)


def sgd_multi_step(entries, momentum, nesterov, live=None) -> int:
    """SGD steps of many C-contiguous parameters of the same momentum and Nesterov flag, in
    as few launches as the slots allow (one per SGD_SLOTS parameters of a dtype).  Each
    entry is (w, grad, velocity or None without momentum, lr, weight_decay, first);
    returns the launches made.  ``live``: the lr of each entry is a zero-argument function
    returning ``(lr,)``, registered with ``live(dtype, getters, width=1)`` -> (table, base)
    and read on the device (a captured CUDA graph: pycnn.cuda_graph)."""
    launches = 0
    for dtype, same in _chunks(entries):
        T = dtype.type
        kernels = _build(dtype)
        slots = SGD_SLOTS if momentum else SGD_PLAIN_SLOTS
        for start in range(0, len(same), slots):
            chunk = same[start:start + slots]
            w = [e[0].reshape(-1) for e in chunk]
            g = [e[1].reshape(-1) for e in chunk]
            lr = [T(0 if live else e[3]) for e in chunk]
            wd = [T(e[4]) for e in chunk]
            empty, size = empty_of(w[0]), max(a.size for a in w)
            table = _live_table(live, dtype, [e[3] for e in chunk], 1, w[0])
            if momentum:
                v = [e[2].reshape(-1) for e in chunk]
                first = [np.uint8(e[5]) for e in chunk]
                _launch_slots(kernels.sgd_momentum_multi, slots, (w, g, v, lr, wd, first),
                              (empty, empty, empty, T(0), T(0), np.uint8(0)),
                              (T(momentum), np.uint8(nesterov), *table), w[0], size)
            else:
                _launch_slots(kernels.sgd_plain_multi, slots, (w, g, lr, wd), (empty, empty, T(0), T(0)), table,
                              w[0], size)
            launches += 1
    return launches


def adam_multi_step(entries, beta1, beta2, eps, live=None) -> int:
    """Adam steps of many C-contiguous parameters of the same betas and eps, one launch per
    ADAM_SLOTS parameters of a dtype.  Each entry is (w, grad, m, v, lr, weight_decay,
    step), step counting from 1 (each parameter its own); returns the launches made.
    ``live``: the lr of each entry is a zero-argument function returning ``(lr, 1 -
    beta1**step, 1 - beta2**step)`` for the step it counts, registered with ``live(dtype,
    getters, width=3)`` and read on the device (pycnn.cuda_graph); step must then be > 1."""
    launches = 0
    for dtype, same in _chunks(entries):
        T = dtype.type
        kernels = _build(dtype)
        for start in range(0, len(same), ADAM_SLOTS):
            chunk = same[start:start + ADAM_SLOTS]
            w = [e[0].reshape(-1) for e in chunk]
            if live:
                lr, bias1, bias2 = ([T(0)] * len(chunk),) * 3
            else:
                lr = [T(e[4]) for e in chunk]
                bias1 = [T(1 - beta1 ** e[6]) for e in chunk]
                bias2 = [T(1 - beta2 ** e[6]) for e in chunk]
            lists = (w, [e[1].reshape(-1) for e in chunk], [e[2].reshape(-1) for e in chunk],
                     [e[3].reshape(-1) for e in chunk], lr, [T(e[5]) for e in chunk], bias1, bias2,
                     [np.uint8(e[6] == 1) for e in chunk])
            empty = empty_of(w[0])
            fillers = (empty,) * 4 + (T(0), T(0), T(1), T(1), np.uint8(0))
            table = _live_table(live, dtype, [e[4] for e in chunk], 3, w[0])
            _launch_slots(kernels.adam_multi, ADAM_SLOTS, lists, fillers, (T(beta1), T(beta2), T(eps), *table), w[0],
                          max(a.size for a in w))
            launches += 1
    return launches


def sum_squares_and_abs(arrays):
    """Per array, the sums of its squares and of its absolute values (in float64), computed
    on the device in one launch per SUM_SLOTS arrays of a dtype, and left there: returns
    ``(parts, finish)``; ``finish(host_parts)`` turns ``parts`` copied to the host (one read
    for all) into an (len(arrays), 2) float64 array, summed over blocks in a fixed order."""
    flat = [a.reshape(-1) for a in arrays]
    order = []  # the position of each array in parts' slots
    chunks = []
    for dtype, same in _chunks([(a, i) for i, a in enumerate(flat)]):
        for start in range(0, len(same), SUM_SLOTS):
            chunks.append((dtype, same[start:start + SUM_SLOTS]))
    xp = array_module(flat[0])
    blocks = reduce_blocks(max(a.size for a in flat))
    parts = xp.empty((len(chunks), blocks, SUM_SLOTS, 2), np.float64)
    for c, (dtype, chunk) in enumerate(chunks):
        w = [a for a, _ in chunk]
        order += [(c, k, i) for k, (_, i) in enumerate(chunk)]
        out = parts[c]
        args = w + [empty_of(w[0])] * (SUM_SLOTS - len(w)) + [out]
        launch(_build(dtype).sums_multi, (blocks,), (REDUCE_THREADS,), out, *args)

    def finish(host_parts):
        totals = np.asarray(host_parts).sum(axis=1)  # (chunks, SUM_SLOTS, 2)
        result = np.empty((len(flat), 2))
        for c, k, i in order:
            result[i] = totals[c, k]
        return result
    return parts, finish
