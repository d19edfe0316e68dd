"""The op registry: every op declared once, with its reference, costs and implementations.

An op is
  * a reference ``forward(ctx, *inputs, **params) -> output`` and
    ``backward(ctx, grad_output) -> tuple of input gradients`` written against the array API
    (NumPy, and CuPy through the same code): short, plain, the spec;
  * ``flops(*input_shapes, **params)`` and ``bytes(*input_shapes, itemsize, **params)``, so
    benchmarks print GFLOP/s and GB/s;
  * ``check(*inputs, **params)``: the argument checks, shared by every implementation;
  * implementations keyed by ``(backend, algorithm)``.  Forward and backward of one
    implementation come as a pair: whatever ``forward`` stores on ``ctx`` is private to it.
  * ``samples(rng, dtype)``: small inputs (odd sizes included) that drive the test suite.

``inputs`` are the arrays an op differentiates through (None where one is optional, such as
a missing bias); ``params`` are everything else (numbers, labels, running statistics).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from pycnn.device import BACKENDS, cpp_extension, forced_backend, is_cuda_array

REFERENCE = ("numpy", "reference")


@dataclasses.dataclass(frozen=True)
class Impl:
    forward: Callable
    backward: Callable


@dataclasses.dataclass
class Sample:
    """One test case: differentiable ``inputs`` and keyword ``params``.
    ``differentiable`` says which inputs the gradient check perturbs."""
    inputs: tuple
    params: dict = dataclasses.field(default_factory=dict)
    differentiable: tuple | None = None

    def __post_init__(self):
        if self.differentiable is None:
            self.differentiable = tuple(x is not None for x in self.inputs)


@dataclasses.dataclass
class Op:
    name: str
    check: Callable
    flops: Callable
    bytes: Callable
    samples: Callable
    impls: dict = dataclasses.field(default_factory=dict)
    # (backend, input shapes, params) -> algorithm, for backends with several algorithms
    choose_algo: Callable | None = None

    def register(self, backend: str, forward: Callable, backward: Callable, algo: str = "default") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.impls[(backend, algo)] = Impl(forward, backward)

    @property
    def reference(self) -> Impl:
        return self.impls[REFERENCE]

    def algorithms(self, backend: str) -> list[str]:
        _load_backend(backend)
        return [algo for (b, algo) in self.impls if b == backend]

    def backends(self) -> list[str]:
        for backend in BACKENDS:
            _load_backend(backend)
        return sorted({b for (b, _) in self.impls}, key=BACKENDS.index)

    def resolve(self, inputs, params, algo: str = "auto") -> tuple[str, str, Impl]:
        """(backend, algorithm, implementation) for these inputs.

        The device of the inputs decides; a forced backend takes over where it implements
        the op.  ``algo='auto'`` picks, a named algorithm must exist for that backend."""
        on_gpu = any(is_cuda_array(x) for x in inputs if x is not None)
        backend = forced_backend()
        if backend is not None:
            if backend == "cuda" and not on_gpu and not _cuda_simulated():
                raise TypeError(f"{self.name}: backend 'cuda' needs CUDA arrays (CuPy), got host arrays")
            if backend == "cpp" and on_gpu:
                raise TypeError(f"{self.name}: backend 'cpp' needs host (NumPy) arrays, got CUDA arrays")
        else:
            backend = "cuda" if on_gpu else ("cpp" if cpp_extension() is not None else "numpy")
        available = self.algorithms(backend)
        if not available:
            backend, available = "numpy", ["reference"]
        if algo == "auto":
            chosen = available[0]
            if self.choose_algo is not None and len(available) > 1:
                shapes = [None if x is None else tuple(x.shape) for x in inputs]
                chosen = self.choose_algo(backend, shapes, params)
        elif algo in available:
            chosen = algo
        else:
            raise ValueError(
                f"{self.name}: algo {algo!r} is not available on backend {backend!r}; "
                f"choose one of {['auto'] + available}")
        return backend, chosen, self.impls[(backend, chosen)]


REGISTRY: dict[str, Op] = {}


def declare(name: str, *, forward, backward, check, flops, bytes, samples, choose_algo=None) -> Op:
    """Declare an op with its NumPy reference; backends add implementations with ``register``."""
    if name in REGISTRY:
        raise ValueError(f"op {name!r} is already declared")
    op = Op(name=name, check=check, flops=flops, bytes=bytes, samples=samples, choose_algo=choose_algo)
    op.register(*REFERENCE[:1], forward=forward, backward=backward, algo=REFERENCE[1])
    REGISTRY[name] = op
    return op


def get(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; known ops: {sorted(REGISTRY)}") from None


def all_ops() -> Iterator[Op]:
    return iter(REGISTRY.values())


# ------------------------------------------------------------ backends that load on demand

_backend_loaders: dict[str, Callable[[], None]] = {}
_backends_loaded: set[str] = {"numpy"}


def add_backend_loader(backend: str, loader: Callable[[], None]) -> None:
    """``loader`` registers the implementations of ``backend`` the first time it is needed."""
    _backend_loaders[backend] = loader


def _load_backend(backend: str) -> None:
    if backend in _backends_loaded:
        return
    _backends_loaded.add(backend)
    loader = _backend_loaders.get(backend)
    if loader is not None:
        loader()


def _cuda_simulated() -> bool:
    import os
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
