"""conv3x3 backward-weights alone: pycnn's direct grad_weight against PyTorch (oneDNN).

    python bench/conv_grad_weight.py [--batch 64 128] [--rounds 9] [--baseline DIR]

Each framework runs in a worker process of its own (this script started with --worker): the
parent sends "time shape i" commands and interleaves the frameworks within every round (the
order alternates between rounds), so that the load of a shared machine hits both alike.
Reported: the median over the rounds of each block's median call time (--stat min: the
fastest call), the ratio
torch_time / pycnn_time (> 1: pycnn is faster), GFLOP/s (2*N*K*C*9*H*W flops) and the
fraction of the FMA peak (pycnn._C.fma_peak_gflops, measured in the pycnn worker).

  pycnn   _C.conv3x3_grad_weight(x, gy, gw, None): the weight gradient only, float32,
          the OpenMP default thread count (2 on the reference machine)
  torch   torch.ops.aten.convolution_backward(..., output_mask=[False, True, False]),
          torch.set_num_threads(threads or 2)
  --baseline DIR (repeatable): one more worker each, pycnn with the extension binaries of DIR
          (PYCNN_EXTENSION_DIR), e.g. a copy of build/*/_C_avx*.so taken before a change;
          its column "DIR/pycnn" is its time over the current build's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (C, K, H, W) of the six 3x3 convs of the README net (CIFAR-10)
SHAPES = [(3, 32, 32, 32), (32, 32, 32, 32), (32, 64, 16, 16), (64, 64, 16, 16), (64, 128, 8, 8),
          (128, 128, 8, 8)]


def flops(n, c, k, h, w):
    return 2 * n * k * c * 9 * h * w


# ----------------------------------------------------------------------------- workers
def _worker(framework: str, cases: list[tuple[int, int, int, int, int]], threads: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    data = []
    for n, c, k, h, w in cases:
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = rng.standard_normal((k, c, 3, 3), dtype=np.float32)
        gy = rng.standard_normal((n, k, h, w), dtype=np.float32)
        data.append((x, wt, gy))
    info = {}
    if framework == "torch":
        import torch

        torch.set_num_threads(threads or 2)
        tdata = [tuple(torch.from_numpy(a) for a in d) for d in data]

        def make(i):
            x, wt, gy = tdata[i]

            def call():
                torch.ops.aten.convolution_backward(gy, x, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                    [False, True, False])
            return call
        info["threads"] = torch.get_num_threads()
    else:
        from pycnn import _C

        if threads:
            _C.set_num_threads(threads)
        outs = [np.empty_like(d[1]) for d in data]

        def make(i):
            x, wt, gy = data[i]
            gw = outs[i]

            def call():
                _C.conv3x3_grad_weight(x, gy, gw, None)
            return call
        info["threads"] = _C.num_threads()
        info["variant"] = _C.build_info()["variant"]
        info["fma_peak_gflops"] = max(_C.fma_peak_gflops(20_000_000) for _ in range(3))
    calls = [make(i) for i in range(len(cases))]
    for call in calls:  # warm-up
        call()
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "peak":
            from pycnn import _C
            print(json.dumps(_C.fma_peak_gflops(20_000_000)), flush=True)
            continue
        i, budget = int(cmd[1]), float(cmd[2])
        call = calls[i]
        call()
        times = []
        t_end = time.perf_counter() + budget
        while len(times) < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(json.dumps([statistics.median(times), min(times)]), flush=True)


class Worker:
    def __init__(self, name, framework, cases, env_extra=None, threads=0):
        env = dict(os.environ)
        env.update(env_extra or {})
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", framework, "--cases", json.dumps(cases),
                                      "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self.proc.stdout.readline())

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of every worker (default: torch 2, pycnn the OpenMP default)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per timed block (default 0.15)")
    ap.add_argument("--baseline", action="append", default=[],
                    help="folder of other pycnn extension binaries (PYCNN_EXTENSION_DIR): one more worker each, "
                         "named by the folder (repeatable)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="median: the median over the rounds of each block's median (default); min: the fastest "
                         "call of all rounds (the least disturbed by other load)")
    ap.add_argument("--shapes", type=int, nargs="+", help="indices into the six shapes (default all)")
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, [tuple(c) for c in json.loads(args.cases)], args.threads)
        return
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    cases = [(n, c, k, h, w) for n in args.batch for (c, k, h, w) in shapes]
    workers = [Worker("pycnn", "pycnn", cases, threads=args.threads),
               Worker("torch", "torch", cases, threads=args.threads)]
    for folder in args.baseline:
        workers.append(Worker(os.path.basename(os.path.normpath(folder)), "pycnn", cases,
                              {"PYCNN_EXTENSION_DIR": os.path.abspath(folder)}, threads=args.threads))
    others = [wk.name for wk in workers[2:]]
    peak = workers[0].info["fma_peak_gflops"]
    load0 = os.getloadavg()[0]
    times = {wk.name: [[] for _ in cases] for wk in workers}
    for r in range(args.rounds):
        for i in range(len(cases)):
            order = workers if (r + i) % 2 == 0 else workers[::-1]
            for wk in order:
                times[wk.name][i].append(wk.ask(f"time {i} {args.budget}"))
    peak_after = workers[0].ask("peak")
    load1 = os.getloadavg()[0]
    for wk in workers:
        wk.close()
    peak = max(peak, peak_after)

    names = [wk.name for wk in workers]
    print(f"conv3x3 grad_weight, float32; pycnn {workers[0].info['variant']} with {workers[0].info['threads']} "
          f"OpenMP threads, torch {workers[1].info['threads']} threads; {args.rounds} rounds, "
          + ("medians of the blocks' medians" if args.stat == "median" else "the fastest calls"))
    print(f"FMA peak (pycnn._C.fma_peak_gflops, best of 4): {peak:.1f} GFLOP/s; "
          f"1-min load average {load0:.2f} (start) / {load1:.2f} (end)")
    hdr = f"{'N':>4} {'C':>4} {'K':>4} {'HxW':>6} | " + " ".join(f"{n + ' ms':>10}" for n in names)
    hdr += f" | {'torch/pycnn':>11}" + "".join(f" {o + '/pycnn':>12}" for o in others)
    hdr += f" | {'pycnn GF/s':>10} {'% peak':>6} {'torch GF/s':>10} {'% peak':>6}"
    print(hdr)
    print("-" * len(hdr))
    totals = {}
    for i, (n, c, k, h, w) in enumerate(cases):
        if args.stat == "median":
            med = {name: statistics.median(t[0] for t in times[name][i]) for name in names}
        else:
            med = {name: min(t[1] for t in times[name][i]) for name in names}
        for name in names:
            totals.setdefault(n, {}).setdefault(name, 0.0)
            totals[n][name] += med[name]
        fl = flops(n, c, k, h, w)
        gp, gt = fl / med["pycnn"] / 1e9, fl / med["torch"] / 1e9
        row = f"{n:>4} {c:>4} {k:>4} {f'{h}x{w}':>6} | " + " ".join(f"{med[m] * 1e3:>10.3f}" for m in names)
        row += f" | {med['torch'] / med['pycnn']:>11.2f}"
        row += "".join(f" {med[o] / med['pycnn']:>12.2f}" for o in others)
        row += f" | {gp:>10.1f} {100 * gp / peak:>5.0f}% {gt:>10.1f} {100 * gt / peak:>5.0f}%"
        print(row)
    for n, tot in totals.items():
        row = f"{n:>4} {'total':>16} | " + " ".join(f"{tot[m] * 1e3:>10.3f}" for m in names)
        row += f" | {tot['torch'] / tot['pycnn']:>11.2f}"
        row += "".join(f" {tot[o] / tot['pycnn']:>12.2f}" for o in others)
        print(row)


if __name__ == "__main__":
    main()
