"""Each registry op written in PyTorch: the ``torch`` field of its spec (pycnn/ops/*.py).

Random ops cannot share PyTorch's generator: the specs of rrelu and dropout are written
with pycnn's counter-based draws, so the check covers the formula (slopes, scaling).
"""
from __future__ import annotations

from pycnn.ops import registry

TORCH_EQUIVALENTS = {op.name: op.torch for op in registry.all_ops()}
