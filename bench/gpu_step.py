"""Training-step throughput on one GPU: pycnn's CUDA backend against PyTorch (cuDNN), each
framework in its own process, interleaved, medians over repeats.

    python bench/gpu_step.py                       # batches 64, 256, 1024; 3 repeats
    python bench/gpu_step.py --batches 256 --repeats 5 --json step.json

The net is the README's VGG (widths 32/64/128, two conv3x3 + batch norm + ReLU per stage,
2x2 max pooling, linear), float32, SGD with Nesterov momentum, one synthetic CIFAR-sized
batch (the data pipeline is not timed: this measures the engine).  PyTorch runs with
cudnn.benchmark, once with TF32 convolutions and matmuls (its default for convolutions) and
once with TF32 off (plain FP32, what pycnn computes).  Each child process reports the time
of its first step (JIT compilation and caches included), the median step time over
``--steps`` steps after ``--warmup`` steps, and (pycnn) the kernels it launched per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (32, 64, 128)


def _synthetic_batch(batch: int):
    import numpy as np
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    return images, labels


def _time_steps(step, synchronize, steps: int, warmup: int) -> dict:
    start = time.perf_counter()
    step()
    synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "step_ms": 1e3 * statistics.median(times)}


def _profile_pycnn(net, opt, x, y, step) -> None:
    """Where a step's time goes: device time per op (synchronised around each), the
    optimizer, and the host time to enqueue a whole step without waiting for the GPU."""
    import cupy

    import pycnn
    import pycnn.functional as F
    sync = cupy.cuda.Device().synchronize
    with pycnn.profile(synchronize=True) as p:
        for _ in range(5):
            loss = F.softmax_cross_entropy(net(pycnn.Tensor(x)), y)
            opt.zero_grad()
            loss.backward()
    print(p.table(top=40), flush=True)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        opt.step()
    sync()
    print(f"optimizer step (multi-tensor kernels): {(time.perf_counter() - start) / 5 * 1e3:.3f} ms", flush=True)
    _profile_optimizer_paths(net, opt, sync)
    start = time.perf_counter()
    for _ in range(5):
        step()
    enqueue = (time.perf_counter() - start) / 5
    sync()
    total = (time.perf_counter() - start) / 5
    print(f"host time to enqueue a step: {enqueue * 1e3:.3f} ms of {total * 1e3:.3f} ms", flush=True)


def _profile_optimizer_paths(net, opt, sync) -> None:
    """The multi-tensor SGD update against the per-parameter kernel (one launch each), and
    the trainer's regularisation term: one launch and one read against one host read per
    parameter, each timed with the GPU synchronised."""
    import cupy

    from pycnn import optim
    from pycnn.ops import cuda_backend
    from pycnn.training.trainer import regularisation_loss
    kernels = cuda_backend.optimizer_kernels()
    params = [p for p in net.parameters() if p.grad is not None]
    velocities = [opt.state[id(p)]["velocity"] for p in params]

    def timed(run, repeats=20):
        run()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        sync()
        return (time.perf_counter() - start) / repeats * 1e3

    def per_parameter():
        for p, v in zip(params, velocities):
            kernels.sgd_step(p.data, p.grad, v, 1e-9, 0.9, 0.0, True, False)
    print(f"optimizer, one launch per parameter ({len(params)}): {timed(per_parameter):.3f} ms; "
          f"multi-tensor: {timed(opt.step):.3f} ms", flush=True)
    decayed = optim.SGD(optim.param_groups(net, weight_decay=5e-4), lr=0.01)

    def read_per_parameter():
        return sum(0.5 * 5e-4 * float(cupy.dot(p.data.reshape(-1), p.data.reshape(-1)))
                   for p in decayed.param_groups[0]["params"])
    print(f"regularisation term, one read per parameter: {timed(read_per_parameter):.3f} ms; "
          f"one launch and one read: {timed(lambda: regularisation_loss(decayed)):.3f} ms "
          f"(values {read_per_parameter():.6g} / {regularisation_loss(decayed):.6g})", flush=True)


def run_pycnn(batch: int, steps: int, warmup: int, profile: bool = False, graph: bool = False) -> dict:
    """``graph``: every step after the first replays one captured CUDA graph (pycnn.cuda_graph)."""
    import cupy

    import pycnn
    import pycnn.functional as F
    from pycnn import models, optim
    from pycnn.cuda_graph import GraphedStep
    from pycnn.ops import cuda_backend

    images, labels = _synthetic_batch(batch)
    net = models.vgg(3, 32, 10, widths=WIDTHS, convs_per_stage=2).to("cuda")
    opt = optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = cupy.asarray(images), cupy.asarray(labels)

    def whole_step(images, targets):
        loss = F.softmax_cross_entropy(net(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    if graph:
        graphed = GraphedStep(whole_step, optimizer=opt, model=net)

        def step():
            graphed(x, y)
    else:
        def step():
            whole_step(pycnn.Tensor(x), y)

    result = _time_steps(step, cupy.cuda.Device().synchronize, steps, warmup)
    if graph:
        result["graph"] = {"captures": graphed.captures, "replays": graphed.replays, "disabled": graphed.disabled}
    if profile:
        _profile_pycnn(net, opt, x, y, step)
    kernels = cuda_backend.kernels_package()
    before, raw_before = kernels._launch.launch_count(), kernels._rawlaunch.launch_count()
    step()
    cupy.cuda.Device().synchronize()
    # every launch of our kernels (either path), and those that took the raw path
    result["pycnn_kernels_per_step"] = kernels._launch.launch_count() - before
    result["pycnn_raw_launches_per_step"] = kernels._rawlaunch.launch_count() - raw_before
    return result


def run_torch(batch: int, steps: int, warmup: int, tf32: bool) -> dict:
    import torch
    from torch import nn

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    layers, channels = [], 3
    for width in WIDTHS:
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(channels * 4 * 4, 10)]
    net = nn.Sequential(*layers).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images, labels = _synthetic_batch(batch)
    x, y = torch.from_numpy(images).cuda(), torch.from_numpy(labels).cuda()
    loss_fn = nn.CrossEntropyLoss()

    def step():
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time_steps(step, torch.cuda.synchronize, steps, warmup)


def _child(args) -> None:
    if args.framework.startswith("pycnn"):
        result = run_pycnn(args.batch, args.steps, args.warmup, profile=args.profile,
                           graph=args.framework == "pycnn-graph")
    else:
        result = run_torch(args.batch, args.steps, args.warmup, tf32=args.framework == "torch-tf32")
    result["img_per_s"] = args.batch / (result["step_ms"] / 1e3)
    print("RESULT " + json.dumps(result), flush=True)


FRAMEWORKS = ("pycnn", "pycnn-graph", "torch-fp32", "torch-tf32")


def _run_child(framework: str, batch: int, steps: int, warmup: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--child", framework, "--batch", str(batch), "--steps", str(steps),
               "--warmup", str(warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{framework} at batch {batch} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="processes per framework and batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"comma-separated, of {', '.join(FRAMEWORKS)} (ratios need pycnn and torch-fp32)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--profile", action="store_true",
                        help="one pycnn process: device time per op, optimizer, host enqueue time")
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.framework = args.child
        _child(args)
        return 0
    if args.profile:
        args.framework, args.batch = "pycnn", int(args.batches.split(",")[0])
        _child(args)
        return 0
    frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    unknown = [name for name in frameworks if name not in FRAMEWORKS]
    if unknown or not frameworks:
        parser.error(f"--frameworks takes names from {', '.join(FRAMEWORKS)}; got {args.frameworks!r}")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = {name: [] for name in frameworks}
        for _ in range(args.repeats):  # interleaved: a drifting clock or neighbour hits all alike
            for name in frameworks:
                runs[name].append(_run_child(name, batch, args.steps, args.warmup))
        row = {"batch": batch, "conv": os.environ.get("PYCNN_CUDA_CONV", "gemm")}
        for name, results in runs.items():
            row[f"{name}_img_per_s"] = statistics.median(r["img_per_s"] for r in results)
            # the best of the repeats: the first process of a fresh machine also fills the caches
            row[f"{name}_first_step_s"] = min(r["first_step_s"] for r in results)
        for name in ("pycnn", "pycnn-graph"):
            if name in runs:
                row[f"{name}_kernels_per_step"] = runs[name][0].get("pycnn_kernels_per_step")
                row[f"{name}_graph"] = runs[name][0].get("graph")
                for torch_name in ("torch-fp32", "torch-tf32"):
                    if torch_name in runs:
                        row[f"{name}_vs_{torch_name}"] = row[f"{name}_img_per_s"] / row[f"{torch_name}_img_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = [f"{name} img/s" for name in frameworks] + [
        f"{p} vs {t}" for p in ("pycnn", "pycnn-graph") for t in ("torch-fp32", "torch-tf32")
        if p in frameworks and t in frameworks] + [f"{p} first step s" for p in ("pycnn", "pycnn-graph")
                                                    if p in frameworks]
    print(f"\nconv3x3 on CUDA: {rows[0]['conv'] if rows else '-'}")
    print("| batch | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for r in rows:
        cells = [f"{r[f'{name}_img_per_s']:,.0f}" for name in frameworks]
        cells += [f"{r[f'{p}_vs_{t}']:.2f}" for p in ("pycnn", "pycnn-graph") for t in ("torch-fp32", "torch-tf32")
                  if p in frameworks and t in frameworks]
        cells += [f"{r[f'{p}_first_step_s']:.2f}" for p in ("pycnn", "pycnn-graph") if p in frameworks]
        print(f"| {r['batch']} | " + " | ".join(cells) + " |")
        graph = r.get("pycnn-graph_graph")
        if graph and graph["disabled"]:
            print(f"  (batch {r['batch']}: the CUDA graph was given up: {graph['disabled']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
