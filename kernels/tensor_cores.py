"""TF32 tensor cores from Numba: two PTX instructions as inline-assembly intrinsics, and
their emulation for Numba's CUDA simulator.

    tf32_round(v)   cvt.rna.tf32.f32: v rounded to TF32 (10 stored mantissa bits, to nearest,
                    ties away from zero), returned as a float32 whose low 13 bits are zero
    mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)
                    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: one warp computes
                    D (16 x 8) = A (16 x 8) @ B (8 x 8) + C (16 x 8), float32 accumulation

Every lane of the warp must make the same mma_tf32 call.  Lane l holds, with g = l // 4
and t = l % 4 (the PTX ISA's fragment layout for m16n8k8 .tf32):

    a0 = A[g, t]    a1 = A[g + 8, t]    a2 = A[g, t + 4]    a3 = A[g + 8, t + 4]
    b0 = B[t, g]    b1 = B[t + 4, g]
    c0, c1 = C[g, 2t], C[g, 2t + 1]      c2, c3 = C[g + 8, 2t], C[g + 8, 2t + 1]   (D alike)

Error: rounding each operand to TF32 is a relative error of at most 2^-11 (4.9e-4); the
products of TF32 numbers are exact in float32 and are summed in float32, so a dot product
of length R is off by at most about (2^-10 + R 2^-23) sum |a||b| (PyTorch's allow_tf32
makes the same trade).  Needs compute capability 8.0 or newer (``check_device``).

In the simulator the emulation exchanges the warp's fragments through shared memory (two
block barriers per call: every thread of the block must call it, as the kernels here do).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ._launch import SIMULATED

MAX_BLOCK_THREADS = 1024
_TF32_KEEP = 0xFFFFE000  # sign, exponent and the 10 mantissa bits TF32 keeps
_TF32_HALF = 0x1000      # half a unit in the last kept place


def _tf32_bits(value) -> np.float32:
    """TF32 rounding of one float32 (cvt.rna): to nearest, ties away from zero; inf and NaN
    kept; a value past the largest TF32 number becomes inf."""
    bits = int(np.float32(value).view(np.uint32))
    if bits & 0x7F800000 == 0x7F800000:
        return np.float32(value)
    return np.uint32((bits + _TF32_HALF) & _TF32_KEEP).view(np.float32)


def tf32_round_array(a: np.ndarray) -> np.ndarray:
    """tf32_round on every element of a float32 array (for references and tests)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = ((bits.astype(np.uint64) + _TF32_HALF) & _TF32_KEEP).astype(np.uint32)
    return np.where(special, bits, rounded).view(np.float32).reshape(np.shape(a))


def _mma_tf32_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    exchange = cuda.shared.array((MAX_BLOCK_THREADS, 6), np.float32)
    tid = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
    exchange[tid] = (a0, a1, a2, a3, b0, b1)
    cuda.syncthreads()
    lane = tid % 32
    # the warp's fragments, operands read as TF32 (the hardware ignores the low 13 bits)
    warp = (exchange[tid - lane:tid - lane + 32].view(np.uint32) & np.uint32(_TF32_KEEP)).view(np.float32)
    a = np.empty((16, 8), np.float32)
    b = np.empty((8, 8), np.float32)
    # lane l = 4 g + t: reshape(8, 4)[g, t] is lane l's value
    a[:8, :4], a[8:, :4], a[:8, 4:], a[8:, 4:] = (warp[:, r].reshape(8, 4) for r in range(4))
    b[:4, :], b[4:, :] = warp[:, 4].reshape(8, 4).T, warp[:, 5].reshape(8, 4).T
    cuda.syncthreads()  # everyone has read the exchange before the next call writes it
    g, t = lane // 4, lane % 4
    out = []
    for value, row, col in ((c0, g, 2 * t), (c1, g, 2 * t + 1), (c2, g + 8, 2 * t), (c3, g + 8, 2 * t + 1)):
        total = np.float32(value)
        for k in range(8):
            total = np.float32(total + a[row, k] * b[k, col])  # exact products, float32 sums
        out.append(total)
    return tuple(out)


if SIMULATED:  # as device functions: the simulator gives those its per-block cuda.shared
    tf32_round = cuda.jit(device=True)(_tf32_bits)
    mma_tf32 = cuda.jit(device=True)(_mma_tf32_emulated)
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def tf32_round(typingctx, value):
        def codegen(context, builder, signature, args):
            convert = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.FloatType()]),
                                   "cvt.rna.tf32.f32 $0, $1;", "=r,f")
            return builder.bitcast(builder.call(convert, args), ir.FloatType())
        return types.float32(types.float32), codegen

    @intrinsic
    def mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        f32 = types.float32

        def codegen(context, builder, signature, args):
            i32, f32_ir = ir.IntType(32), ir.FloatType()
            mma = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([f32_ir] * 4), [i32] * 6 + [f32_ir] * 4),
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            operands = [builder.bitcast(v, i32) for v in args[:6]] + list(args[6:])
            d = builder.call(mma, operands)
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(d, i) for i in range(4)])
        return types.UniTuple(f32, 4)(*([f32] * 10)), codegen


_checked = False


def check_device() -> None:
    """One clear error when the current GPU has no TF32 tensor cores (before sm_80)."""
    global _checked
    if _checked or SIMULATED:
        return
    major, minor = cuda.get_current_device().compute_capability
    if major < 8:
        raise ValueError(f"algo 'igemm_tf32' needs TF32 tensor cores (compute capability 8.0 or newer); "
                         f"this GPU is {major}.{minor}: use algo 'igemm' or 'gemm'")
    _checked = True
