"""The ulp error of the C++ backend's vectorised exp and expm1 (csrc/vecmath.hpp), over EVERY
float32 input x <= 0: a proof of their bound by exhaustion, not a sample.

    python bench/exp_ulp.py              # all 2^31 inputs with the sign bit set, about a minute
    python bench/exp_ulp.py --chunks 8   # the first 8 of 128 chunks (a quick look)

They are reached through the elu kernels, which are made of them: with alpha = 1,
elu_forward(x) = expm1(x) and elu_backward(x, grad=1) = exp(x) exactly for x <= 0 (the
multiplications by 1 are exact).  The reference is NumPy's float64 exp / expm1 of the same
float32 input; the error of a result y is |y - ref| in units of the float32 ulp at ref
(2^(e - 24) for ref in [2^(e-1), 2^e), at least 2^-149, the spacing of the subnormals).
NaN inputs are skipped (they give NaN, checked by the tests); -inf and -0 are included.
Below -104 exp is 0 (less than half the least subnormal) and below -40 expm1 is -1.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

CHUNK = 1 << 24  # inputs per chunk: 2^31 / 2^24 = 128 chunks


def ulp_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    _, exponent = np.frexp(ref)  # ref = m 2^exponent, 0.5 <= |m| < 1
    ulp = np.ldexp(1.0, np.maximum(exponent - 24, -149))
    return np.abs(got.astype(np.float64) - ref) / ulp


def scan(C, chunks: int):
    """(worst exp ulp, its x, worst expm1 ulp, its x) over the first ``chunks`` chunks."""
    worst = {"exp": (0.0, 0.0), "expm1": (0.0, 0.0)}
    out = np.empty(CHUNK, np.float32)
    ones = np.ones(CHUNK, np.float32)
    for i in range(chunks):
        bits = np.arange(0x80000000 + i * CHUNK, 0x80000000 + (i + 1) * CHUNK, dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        x = x[~np.isnan(x)]
        x64 = x.astype(np.float64)
        n = x.size
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            C.elu_forward(x, out[:n], 1.0)
            for name, ref in (("expm1", np.expm1(x64)),):
                err = ulp_errors(out[:n], ref)
                j = int(np.argmax(err))
                if err[j] > worst[name][0]:
                    worst[name] = (float(err[j]), float(x[j]))
            C.elu_backward(x, ones[:n], out[:n], 1.0)
            err = ulp_errors(out[:n], np.exp(x64))
            j = int(np.argmax(err))
            if err[j] > worst["exp"][0]:
                worst["exp"] = (float(err[j]), float(x[j]))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=128, help="chunks of 2^24 inputs to scan (128: all)")
    args = parser.parse_args(argv)
    if not 1 <= args.chunks <= 128:
        parser.error("--chunks must be in 1 .. 128")
    from pycnn.device import cpp_extension
    C = cpp_extension()
    if C is None:
        print("exp_ulp: needs the C++ extension pycnn._C, which is not built", file=sys.stderr)
        return 1
    start = time.perf_counter()
    worst = scan(C, args.chunks)
    scope = "every float32 x <= 0" if args.chunks == 128 else f"{args.chunks} of 128 chunks of float32 x <= 0"
    import pycnn
    print(f"{scope} ({time.perf_counter() - start:.0f} s), {pycnn.cpu_info()['module']}:")
    for name, (ulps, x) in worst.items():
        print(f"  {name:6s} max error {ulps:.3f} ulp (at x = {x!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
