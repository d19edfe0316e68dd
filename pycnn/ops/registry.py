"""The op registry: every op declared once, with everything about it in one spec.

An op (``declare``) is
  * a reference ``forward(ctx, *inputs, **params) -> output`` and
    ``backward(ctx, grad_output) -> tuple of input gradients`` written against the array API
    (NumPy, and CuPy through the same code): short, plain, the spec;
  * ``check(*inputs, **params)``: the argument checks, shared by every implementation;
  * its costs, as functions of the input shapes: ``flops`` / ``bytes`` of the forward pass
    and ``backward_flops`` / ``backward_bytes`` of the backward pass (``Op.cost``);
  * ``torch(*tensors, **params)``: the op written in PyTorch (imported lazily), the
    independent check; ``torch_native`` where torch draws its own random numbers (timed by
    the benchmarks, never compared);
  * ``samples(rng, dtype)``: small inputs and edge cases (odd sizes, NaN, infinities) that
    drive the test suite;
  * ``bench``: the benchmark cases (``BenchCase``: shapes, params, CPU or GPU), and
    ``bench_inputs(rng, shapes, params)`` to make their arrays;
  * implementations keyed by ``(backend, algorithm)`` (``register``; forward and backward
    of one implementation come as a pair: what ``forward`` stores on ``ctx`` is private to
    it).  ``portable`` ops are their reference on every backend (array-API code: NumPy with
    single-threaded BLAS on the CPU, CuPy on a GPU), registered as the algorithm 'reference';
  * for an activation that conv3x3_act can apply, ``conv_epilogue`` (``Epilogue``);
  * for an op the front ends offer as a function and a layer, ``api`` (``Api``).

``inputs`` are the arrays an op differentiates through (None where one is optional, such as
a missing bias); ``params`` are everything else (numbers, labels, running statistics).
Which implementation runs a call is decided in ``pycnn.ops.routing``.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator

import numpy as np

from pycnn.device import BACKENDS


class Algo(str, enum.Enum):
    """Every algorithm name an implementation is registered under (one list for the backends,
    routing, ``pycnn bench`` and the docs).  A str enum: ``Algo.WINOGRAD == "winograd"``."""
    REFERENCE = "reference"  # the op's NumPy/array-API spec
    DEFAULT = "default"  # a backend's only implementation of the op
    DIRECT = "direct"  # conv3x3: the direct loop nest
    WINOGRAD = "winograd"  # conv3x3: Winograd F(2x2, 3x3)
    WINOGRAD4 = "winograd4"  # conv3x3: Winograd F(4x4, 3x3)
    GEMM = "gemm"  # conv3x3: im2col + GEMM
    IGEMM = "igemm"  # conv3x3: implicit GEMM (no im2col matrix)
    IGEMM_TF32 = "igemm_tf32"  # conv3x3: implicit GEMM on TF32 tensor cores
    FUSED = "fused"  # a fused op in one kernel
    CHAIN = "chain"  # a fused op as the chain of ops it replaces
    KERNEL = "kernel"  # an op with a dedicated kernel beside its reference

    def __str__(self) -> str:
        return self.value


def check_algo(algo) -> str:
    """``algo`` as its plain name; one line naming the known ones otherwise."""
    try:
        return Algo(algo).value
    except ValueError:
        raise ValueError(f"algo must be 'auto' or one of {[a.value for a in Algo]}, got {algo!r}") from None


REFERENCE = ("numpy", Algo.REFERENCE.value)
PHASES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Impl:
    forward: Callable
    backward: Callable
    # (inputs, params) -> None, or why this implementation cannot take the call
    refuses: Callable | None = None
    # float32 rounding relative to the plain kernels (Winograd F(4x4, 3x3): 10, its transforms
    # amplify rounding); the tests and the benchmarks' correctness check scale their float32
    # tolerances by it
    rounding: float = 1.0


@dataclasses.dataclass
class Sample:
    """One test case: differentiable ``inputs`` and keyword ``params``.
    ``differentiable`` says which inputs the gradient check perturbs; ``gradcheck`` False
    leaves the sample out of the finite-difference check (infinities, NaN)."""
    inputs: tuple
    params: dict = dataclasses.field(default_factory=dict)
    differentiable: tuple | None = None
    gradcheck: bool = True
    torch_agrees: bool = True  # False: PyTorch differs on purpose (says why where the sample is made)

    def __post_init__(self):
        if self.differentiable is None:
            self.differentiable = tuple(x is not None for x in self.inputs)


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One benchmark shape: input ``shapes`` (None: an absent input) and ``params``;
    ``where`` 'cpu' (``pycnn bench``, bench/) or 'gpu' (bench/test_cuda.py)."""
    shapes: tuple
    params: dict = dataclasses.field(default_factory=dict)
    where: str = "cpu"
    phases: tuple = PHASES


# x (N, C, H, W) of the memory-bound ops (maps, pooling): on the CPU 4-8 MiB (partly
# cache-resident, as a copy of the same size is), on the GPU 64 MiB
MAP_SHAPES = {"cpu": ((32, 64, 32, 32), (32, 128, 16, 16)), "gpu": ((256, 64, 32, 32),)}


def map_bench(params=None, weight: bool = False, gpu: bool = True) -> tuple:
    """The benchmark cases of a memory-bound op on x (N, C, H, W) at MAP_SHAPES; ``weight``:
    it takes one value per channel as well (prelu)."""
    wheres = ("cpu", "gpu") if gpu else ("cpu",)
    return tuple(BenchCase((x, (x[1],)) if weight else (x,), dict(params or {}), where)
                 for where in wheres for x in MAP_SHAPES[where])


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """How conv3x3_act applies an activation where the convolution stores its output.
    ``params``: the conv3x3_act params it reads; ``weight``: it takes prelu_weight;
    ``grad_from_output(params, prelu_weight)``: whether its backward can work from the output
    y alone (else the pre-activation z is kept); ``flops`` per output element."""
    params: tuple = ()
    weight: bool = False
    grad_from_output: Callable = lambda params, weight: False
    flops: int = 1


@dataclasses.dataclass(frozen=True)
class Api:
    """How the front ends offer a one-input op (an activation, a pooling); ``pycnn.frontend``
    makes from it the function of pycnn.functional and pycnn.torch, the layer of pycnn.nn and
    pycnn.torch, and (``activation``) the choice of models.ACTIVATIONS and the CLI.
    ``settings``: the op's params after x, in the function's order, as (name, default, type);
    a ``training`` setting follows a layer's mode and a ``seed`` of None is drawn per call.
    ``weight``: a learned input per channel after x, as (the layer's argument for its
    initial value, its default).  ``torch_layer``: the torch.nn class it computes exactly (the
    layer of ``pycnn.torch.accelerate``'s swap), whose attributes ``torch_settings`` names per
    setting (its own name where absent); ``torch_inplace``: that class takes ``inplace``."""
    function: str
    layer: str
    doc: str
    settings: tuple = ()
    weight: tuple | None = None
    function_aliases: tuple = ()
    layer_aliases: tuple = ()
    activation: bool = False
    torch_layer: str | None = None
    torch_settings: dict = dataclasses.field(default_factory=dict)
    torch_inplace: bool = False


def _standard_normal(rng, shapes, params):
    return tuple(None if s is None else rng.standard_normal(s, dtype=np.float32) for s in shapes), params


@dataclasses.dataclass
class Op:
    name: str
    forward: dataclasses.InitVar[Callable]
    backward: dataclasses.InitVar[Callable]
    check: Callable
    flops: Callable
    bytes: Callable
    samples: Callable
    torch: Callable
    backward_flops: Callable | None = None
    backward_bytes: Callable | None = None
    torch_native: Callable | None = None
    bench: tuple = ()
    bench_inputs: Callable = _standard_normal
    portable: bool = False
    conv_epilogue: Epilogue | None = None
    api: Api | None = None
    # a map y = f(x, *params) whose gradient is computed from x: the params its kernels
    # ``<name>_forward(x, y, *params)`` / ``<name>_backward(x, grad, grad_x, *params)`` take
    # after the arrays, as (name, default, type) (every backend's elementwise idiom)
    elementwise: tuple | None = None
    # (inputs, params) -> [(op name, its extra inputs, its params), ...]: the ops this one fuses
    unfused: Callable | None = None
    impls: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self, forward, backward):
        self.register(*REFERENCE[:1], forward=forward, backward=backward, algo=REFERENCE[1])

    def register(self, backend: str, forward: Callable, backward: Callable, algo: str = "default",
                 refuses: Callable | None = None, rounding: float = 1.0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        algo = check_algo(algo)
        self.impls[(backend, algo)] = Impl(forward, backward, refuses, rounding)

    @property
    def reference(self) -> Impl:
        return self.impls[REFERENCE]

    def algorithms(self, backend: str) -> list[str]:
        load_backend(backend)
        return [algo for (b, algo) in self.impls if b == backend]

    def backends(self) -> list[str]:
        for backend in BACKENDS:
            load_backend(backend)
        return sorted({b for (b, _) in self.impls}, key=BACKENDS.index)

    def resolve(self, inputs, params, algo: str = "auto") -> tuple[str, str, Impl]:
        """(backend, algorithm, implementation) for these inputs (``routing.route``, which
        ``set_router`` hooks in: routing is above the registry)."""
        chosen = _router(self, inputs, params, algo)
        return chosen.backend, chosen.algo, chosen.impl

    def cost(self, phase: str, shapes, params=None, itemsize: int = 4) -> tuple[int, int]:
        """(FLOPs, bytes read + written) of one pass ('fwd', 'bwd' or 'fwd+bwd') on inputs of
        these shapes (None: an absent input)."""
        params = dict(params or {})
        flops = bwd_flops = nbytes = bwd_bytes = 0
        if phase in ("fwd", "fwd+bwd"):
            flops, nbytes = self.flops(*shapes, **params), self.bytes(*shapes, itemsize=itemsize, **params)
        if phase in ("bwd", "fwd+bwd"):
            bwd_flops = self.backward_flops(*shapes, **params)
            bwd_bytes = self.backward_bytes(*shapes, itemsize=itemsize, **params)
        if phase not in ("fwd", "bwd", "fwd+bwd"):
            raise ValueError(f"phase must be 'fwd', 'bwd' or 'fwd+bwd', got {phase!r}")
        return int(flops + bwd_flops), int(nbytes + bwd_bytes)

    def bench_cases(self, where: str = "cpu") -> list[BenchCase]:
        return [case for case in self.bench if case.where == where]


REGISTRY: dict[str, Op] = {}
_router: Callable = None  # routing.route, set by pycnn.ops.routing when it is imported


def set_router(route: Callable) -> None:
    global _router
    _router = route


def declare(name: str, **spec) -> Op:
    """Declare an op (the fields of ``Op``); backends add implementations with ``register``.
    Without ``backward_flops`` the backward costs the forward's FLOPs; without
    ``backward_bytes`` it moves 3/2 of the forward's bytes (a map: read x and grad_y, write
    grad_x, against read x, write y)."""
    if name in REGISTRY:
        raise ValueError(f"op {name!r} is already declared")
    op = Op(name=name, **spec)
    if op.backward_flops is None:
        op.backward_flops = op.flops
    if op.backward_bytes is None:
        forward_bytes = op.bytes
        op.backward_bytes = lambda *shapes, itemsize=4, **params: 3 * forward_bytes(
            *shapes, itemsize=itemsize, **params) // 2
    REGISTRY[name] = op
    return op


def get(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; known ops: {sorted(REGISTRY)}") from None


def all_ops() -> Iterator[Op]:
    return iter(list(REGISTRY.values()))


# ------------------------------------------------------------ backends that load on demand

_backend_loaders: dict[str, Callable[[], None]] = {}
_backends_loaded: set[str] = {"numpy"}


def add_backend_loader(backend: str, loader: Callable[[], None]) -> None:
    """``loader`` registers the implementations of ``backend`` the first time it is needed."""
    _backend_loaders[backend] = loader


def load_backend(backend: str) -> None:
    if backend in _backends_loaded:
        return
    _backends_loaded.add(backend)
    loader = _backend_loaders.get(backend)
    if loader is not None:
        loader()


_load_backend = load_backend  # the name tests and the cuda backend used


# ------------------------------------------------- a fused op as the chain it replaces

class Step:
    """The context of one op of a chain (what its implementation keeps between passes)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors = ()

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays


def chain_pair(fused: str, implementation: Callable | None = None) -> tuple[Callable, Callable]:
    """``forward``/``backward`` of a fused op (conv3x3_act, batchnorm_act) as the chain of ops
    it replaces (its spec's ``unfused``), each run by ``implementation(op, inputs, params)``:
    by default the references (the fused op's reference is that composition), or a backend's
    own routes (a backend without a fused kernel).  Every step keeps its own context."""
    implementation = implementation or (lambda op, inputs, params: op.reference)

    def forward(ctx, *inputs, **params):
        needs = tuple(getattr(ctx, "needs_input_grad", ())) + (True,) * len(inputs)
        ctx.steps, ctx.input_count, out = [], len(inputs), None
        for i, (name, extra, step_params) in enumerate(get(fused).unfused(inputs, params)):
            step_inputs = tuple(extra) if i == 0 else (out,) + tuple(extra)
            # where each step input comes from: an input of the fused op (its index), or the chain (None)
            where = [None if (i > 0 and j == 0) else
                     next((k for k, a in enumerate(inputs) if a is not None and a is x), None)
                     for j, x in enumerate(step_inputs)]
            step = Step(True if k is None else needs[k] for k in where)
            impl = implementation(get(name), step_inputs, step_params)
            out = impl.forward(step, *step_inputs, **step_params)
            ctx.steps.append((step, impl, where))
        return out

    def backward(ctx, grad):
        grads = [None] * ctx.input_count
        for step, impl, where in reversed(ctx.steps):
            step_grads, grad = impl.backward(step, grad), None
            for k, g in zip(where, step_grads):
                if k is None:
                    grad = g  # into the step before
                elif g is not None:
                    grads[k] = g if grads[k] is None else grads[k] + g
        return tuple(grads)
    return forward, backward
