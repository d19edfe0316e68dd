"""The activations a fused kernel applies where it stores its output (conv3x3_act's GEMM
epilogue in conv_gemm, batchnorm_act in batchnorm), as device functions on the
pre-activation z, with the rules of ``pycnn.ops.activations`` (the rectifiers take their
negative branch at z == 0 and for NaN; relu's keeps a NaN, as max(NaN, 0) is NaN there).

Codes (0: no activation); prelu reads one slope per channel, which the caller passes as
``slope``.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

from numba import cuda

ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "prelu": 3, "elu": 4, "swish": 5}
PRELU = ACTIVATIONS["prelu"]


@functools.lru_cache(maxsize=None)
def device_functions(T):
    """``activate`` and ``activation_grad`` for the numba scalar type ``T``."""
    @cuda.jit(device=True)
    def activate(z, code, slope, alpha):
        if code == 1:
            return T(0) if z <= T(0) else z  # NaN stays NaN
        if code == 2 or code == 3:
            return z if z > T(0) else z * slope
        if code == 4:
            return z if z > T(0) else alpha * T(math.expm1(z))
        if code == 5:  # swish: z * sigmoid(z) through e = exp(-|z|)
            e = T(math.exp(-abs(z)))
            return T(0) if z == -math.inf else z * ((T(1) if z >= T(0) else e) / (T(1) + e))
        return z

    @cuda.jit(device=True)
    def activation_grad(z, g, code, slope, alpha):
        """d act / dz * g, from the pre-activation z (exact: no y + alpha cancellation), or
        from y where the activation's spec says y determines it (relu, leaky_relu with a
        slope >= 0, prelu with every slope > 0)."""
        if code == 5:  # swish: s + z e / (1 + e)^2, e = exp(-|z|)
            e = T(math.exp(-abs(z)))
            r = T(1) / (T(1) + e)
            return g * ((T(1) if z >= T(0) else e) * r + (z * e * r * r if e > T(0) else T(0)))
        if code == 0 or z > T(0):
            return g
        if code == 1:
            return T(0)
        if code == 4:
            return g * alpha * T(math.exp(z))
        return g * slope

    return SimpleNamespace(activate=activate, activation_grad=activation_grad)
