"""torchvision models as they are against the same models after ``pycnn.torch.accelerate``.

    python bench/accelerate.py                                   # resnet18 and vgg11_bn, 32x32, 3 rounds
    python bench/accelerate.py --models resnet18 --size 224 --rounds 5

Each (model, task, framework) runs in a worker process of its own (``--worker``), the two
frameworks interleaved round by round; a task is a training step at ``--batch`` (SGD, cross
entropy) or inference (eval mode, no_grad) at batch ``--batch`` and 1.  A worker builds the
model from seed 0, warms up, then times ``--steps`` calls and reports the median seconds per
call and the load average.  The table gives medians over the rounds and pycnn's ratio (torch
time / pycnn time: above 1, pycnn is faster).  Threads: ``--threads`` each (2).

torchvision's compiled operators need not load beside this torch build: only its model
definitions (pure Python) are used, with its operator registrations stubbed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # machine.py beside this file
from machine import loadavg  # noqa: E402

TASKS = ("train", "infer", "infer1")


def _torchvision_models():
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    return importlib.import_module("torchvision.models")


def worker(model_name: str, task: str, framework: str, batch: int, size: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(_torchvision_models(), model_name)(num_classes=10)
    if framework == "pycnn":
        import pycnn.torch as pt
        model, _ = pt.accelerate(model)
    n = 1 if task == "infer1" else batch
    x = torch.randn(n, 3, size, size)
    y = torch.randint(0, 10, (n,))
    if task == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def call():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        model.eval()

        def call():
            with torch.no_grad():
                model(x)
    for _ in range(2):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "loadavg": loadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,vgg11_bn", help="torchvision model names, comma-separated")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)}")
    parser.add_argument("--size", type=int, default=32, help="image side (default: 32)")
    parser.add_argument("--batch", type=int, default=64, help="batch of train and infer (default: 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per worker (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="threads per framework (default: 2)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "TASK", "FRAMEWORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.size, args.steps, args.threads)))
        return 0
    tasks = [t for t in args.tasks.split(",") if t]
    if not set(tasks) <= set(TASKS):
        parser.error(f"--tasks: expected names among {', '.join(TASKS)}, got {args.tasks!r}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results: dict = {}
    for round_ in range(args.rounds):
        for model in args.models.split(","):
            for task in tasks:
                for framework in ("torch", "pycnn") if round_ % 2 == 0 else ("pycnn", "torch"):
                    command = [sys.executable, __file__, "--worker", model, task, framework, "--batch",
                               str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
                               "--threads", str(args.threads)]
                    done = subprocess.run(command, capture_output=True, text=True, env=env)
                    if done.returncode:
                        print(f"{model} {task} {framework}: worker failed\n{done.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    out = json.loads(done.stdout.strip().splitlines()[-1])
                    results.setdefault((model, task, framework), []).append(out)
                    print(f"round {round_ + 1}/{args.rounds} {model:10s} {task:7s} {framework:6s} "
                          f"{out['seconds'] * 1e3:9.1f} ms  (load {out['loadavg']})", flush=True)
    print(f"\nmodel       task     batch  torch ms  pycnn ms  ratio   ({args.size}x{args.size}, "
          f"{args.threads} threads, median of {args.rounds} rounds)")
    rows = []
    for model in args.models.split(","):
        for task in tasks:
            torch_ms, pycnn_ms = (statistics.median(r["seconds"] for r in results[(model, task, f)]) * 1e3
                                  for f in ("torch", "pycnn"))
            batch = 1 if task == "infer1" else args.batch
            rows.append({"model": model, "task": task, "batch": batch, "torch_ms": torch_ms, "pycnn_ms": pycnn_ms,
                         "ratio": torch_ms / pycnn_ms})
            print(f"{model:11s} {task:7s} {batch:5d} {torch_ms:9.1f} {pycnn_ms:9.1f} {torch_ms / pycnn_ms:6.2f}x")
    loads = [r["loadavg"] for rs in results.values() for r in rs if r["loadavg"] is not None]
    if loads:
        print(f"load average during the workers: {min(loads):.2f} to {max(loads):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "size": args.size, "threads": args.threads, "loads": loads}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
