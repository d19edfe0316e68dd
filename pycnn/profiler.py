"""The op profiler: seconds and calls per (op, backend, algorithm, pass).

    with pycnn.profile() as p:
        loss = net(x) ...; loss.backward()
    print(p)                 # the table, slowest first

Every op call through ``pycnn.autograd`` or ``pycnn.torch`` inside the block is recorded with
the route that ran it.
"""
from __future__ import annotations

import contextvars
import sys
import time


class Profile:
    """Seconds and calls per (op, backend, algorithm, pass), collected by ``profile()``.
    Times are host wall-clock: CUDA kernels are asynchronous, so on a GPU they measure
    launches, unless ``synchronize`` is set: then the clock waits for the GPU before each
    reading (slower, but each op's own device time)."""

    def __init__(self, synchronize: bool = False):
        self.seconds: dict[tuple, float] = {}
        self.calls: dict[tuple, int] = {}
        self.synchronize = synchronize
        self._tokens: list = []

    def __enter__(self) -> Profile:
        self._tokens.append(_profile.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _profile.reset(self._tokens.pop())

    def __str__(self) -> str:
        return self.table()

    def clock(self) -> float:
        if self.synchronize and "cupy" in sys.modules:
            sys.modules["cupy"].cuda.Device().synchronize()
        return time.perf_counter()

    def add(self, op, backend, algo, phase, seconds) -> None:
        key = (op, backend, algo, phase)
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self, top: int = 20) -> str:
        total = self.total()
        lines = [f"{'op':<22}{'backend':<8}{'algo':<10}{'pass':<9}{'calls':>7}{'seconds':>10}{'share':>7}"]
        for key, secs in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]:
            op, backend, algo, phase = key
            lines.append(f"{op:<22}{backend:<8}{algo:<10}{phase:<9}{self.calls[key]:>7}{secs:>10.3f}"
                         f"{secs / total if total else 0.0:>7.1%}")
        lines.append(f"{'all ops':<56}{total:>10.3f}")
        return "\n".join(lines)


_profile: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("pycnn_profile", default=None)


def profile(synchronize: bool = False) -> Profile:
    """Time every op call inside the block: ``with pycnn.profile() as p: ...; print(p)``;
    ``synchronize=True`` waits for the GPU around each op (device time per op)."""
    return Profile(synchronize)


def current_profile() -> Profile | None:
    """The profile collecting now, or None."""
    return _profile.get()
