"""pycnn inside a PyTorch training loop: the same CIFAR-10 model in pure torch and
accelerated by ``pycnn.torch.accelerate``, side by side; and the float32 error of an
accelerated model against float64 (``--float32-error``, no timing, no data needed).

    python bench/torch_embed.py                      # 10,000 images, batch 64, 3 rounds
    python bench/torch_embed.py --train 2000 --dtype float64 --rounds 1   # rounding-level match
    python bench/torch_embed.py --float32-error      # precision 'default' / 'high' / torch vs float64

The model: a small VGG-style net, widths 16/32/64, each stage conv3x3 + BatchNorm + ReLU + 2x2
max pool, then flatten and a linear layer, all torch.nn.  Variant ``torch`` runs it as it is;
variant ``pycnn`` runs ``pycnn.torch.accelerate(model)``, whose Conv3x3, BatchNormAct2d (batch
norm and ReLU in one call) and MaxPool2 run pycnn's C++ kernels on the tensors' memory.

How it measures:
* initial weights are drawn once (torch's initialisation, ``--seed``) and saved; both
  variants load them, see the same batches (first ``--train`` training images, per-channel
  standardised, shuffled by ``--seed``, ``--batch`` images, last partial batch dropped) and
  train one epoch with SGD (momentum 0.9, ``--lr`` 0.01: 0.05 spikes the loss to 13 early),
  the loss recorded at every step;
* each variant runs in a process of its own (two OpenMP runtimes in one process would
  distort both; the torch process never imports pycnn), ``--threads`` threads each
  (torch.set_num_threads, and pycnn's kernels), ``--rounds`` rounds in alternating order so
  the changing load of a shared machine falls on both alike; a few warm-up steps on a copy
  of the model come first (not timed, not part of the trajectory);
* reported: median img/s of each variant over the rounds, the ratio of the medians and the
  median of the per-round ratios, and the loss trajectories' largest relative difference
  (float32: the two sum in different orders, so the trajectories drift apart slowly as
  training amplifies rounding; float64 shows the wiring is exact to rounding).

Needs torch (``pip install torch==2.13.0``) and ../shared/data/cifar10 (or PYCNN_CIFAR10_DIR);
exits with a message and status 0 when the data is absent.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # run as a script or imported as bench.<name>: machine.py beside it
from machine import loadavg, mapped_libraries  # noqa: E402

ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10")
VARIANTS = ("torch", "pycnn")
WIDTHS = (16, 32, 64)


def data_dir() -> str:
    return os.environ.get("PYCNN_CIFAR10_DIR", DEFAULT_DATA)


def build_model(variant: str, dtype):
    """conv3x3 + BN + ReLU + maxpool per width, flatten, linear: (N, 3, 32, 32) -> (N, 10);
    variant 'pycnn': accelerated by pycnn.torch.accelerate."""
    import torch
    nn = torch.nn
    layers, c_in = [], 3
    for width in WIDTHS:
        layers += [nn.Conv2d(c_in, width, 3, padding=1, dtype=dtype), nn.BatchNorm2d(width, dtype=dtype), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c_in = width
    side = 32 // 2 ** len(WIDTHS)
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, 10, dtype=dtype))
    if variant == "pycnn":
        import pycnn.torch as pt
        model, _ = pt.accelerate(model)
    return model


# =========================================================================== the worker

def _data(task):
    """The training batches (NCHW float arrays, int64 labels; the same in every worker) and
    the test images, standardised per channel with the training images' statistics."""
    import numpy as np
    with np.load(os.path.join(task["data"], "train.npz")) as d:
        x, y = d["x"][:task["train"]], d["y"][:task["train"]].astype(np.int64)
    with np.load(os.path.join(task["data"], "test.npz")) as d:
        test_x, test_y = d["x"][:task["test"]], d["y"][:task["test"]].astype(np.int64)
    x = x.transpose(0, 3, 1, 2) / 255.0                                    # (N, 32, 32, 3) -> (N, 3, 32, 32)
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True)
    x = ((x - mean) / std).astype(task["dtype"])
    test_x = ((test_x.transpose(0, 3, 1, 2) / 255.0 - mean) / std).astype(task["dtype"])
    order = np.random.default_rng(task["seed"]).permutation(len(y))
    b = task["batch"]
    batches = [(np.ascontiguousarray(x[order[i:i + b]]), y[order[i:i + b]]) for i in range(0, len(y) - b + 1, b)]
    return batches, np.ascontiguousarray(test_x), test_y


def worker(task: dict) -> None:
    import torch
    torch.set_num_threads(task["threads"])
    dtype = getattr(torch, task["dtype"])
    if task["variant"] == "pycnn":
        from pycnn.device import cpp_extension
        C = cpp_extension()
        if C is not None:
            C.set_num_threads(task["threads"])
    batches, test_x, test_y = _data(task)
    model = build_model(task["variant"], dtype)
    model.load_state_dict(torch.load(task["weights"]))
    loss_fn = torch.nn.functional.cross_entropy

    def step(net, opt, x, y):
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    warm = copy.deepcopy(model)  # warm-up on a copy: the trajectory starts from the saved weights
    warm_opt = torch.optim.SGD(warm.parameters(), lr=task["lr"], momentum=0.9)
    for x, y in batches[:task["warmup"]]:
        step(warm, warm_opt, x, y)
    del warm, warm_opt

    opt = torch.optim.SGD(model.parameters(), lr=task["lr"], momentum=0.9)
    load = loadavg()
    losses, start = [], time.perf_counter()
    for x, y in batches:
        losses.append(step(model, opt, x, y))
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(torch.from_numpy(test_x[i:i + 500])).argmax(1)
                               for i in range(0, len(test_x), 500)]).numpy()
    print("RESULT " + json.dumps({
        "variant": task["variant"], "losses": losses, "seconds": seconds,
        "images_per_s": len(losses) * task["batch"] / seconds, "test_accuracy": float((predicted == test_y).mean()),
        "loadavg": load, "libraries": mapped_libraries(basenames=True), "pycnn_imported": "pycnn" in sys.modules,
        "torch_threads": torch.get_num_threads()}), flush=True)


# ================================================================ float32 error (no timing)

def resnet_like(dtype):
    """A stem conv3x3 3 -> 32 + BN + ReLU, then at widths 32, 64, 128 two residual blocks
    (conv3x3-BN-ReLU-conv3x3-BN, plus the input, ReLU; a 1x1 conv widens the skip) with a 2x2
    max pool between widths; global average, linear: (N, 3, 32, 32) -> (N, 10).  Eleven 3x3
    convolutions, all of which accelerate swaps."""
    import torch
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, dtype=dtype),
                                      nn.BatchNorm2d(c_out, dtype=dtype), nn.ReLU(),
                                      nn.Conv2d(c_out, c_out, 3, padding=1, bias=False, dtype=dtype),
                                      nn.BatchNorm2d(c_out, dtype=dtype))
            self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False, dtype=dtype)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.skip(x))

    stem = nn.Conv2d(3, 32, 3, padding=1, bias=False, dtype=dtype)  # (a bias before BN: a gradient of 0 + noise)
    layers, c_in = [stem, nn.BatchNorm2d(32, dtype=dtype), nn.ReLU()], 32
    for i, width in enumerate((32, 64, 128)):
        layers += ([nn.MaxPool2d(2)] if i else []) + [Block(c_in, width), Block(width, width)]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10, dtype=dtype))


def float32_error(seed: int = 0, batch: int = 16) -> dict:
    """The float32 error against the float64 model (training mode) of torch and of accelerate's
    precisions: of the logits, the largest |error| over the largest |logit|; of the gradients,
    the worst parameter's ||error|| / ||gradient|| (2-norms: elementwise, a max pool or ReLU
    decided the other way by a rounding moves whole gradient entries, in torch's float32 too)."""
    import torch

    import pycnn.torch as pt
    torch.manual_seed(seed)
    reference = resnet_like(torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64, generator=gen)
    upstream = torch.randn(batch, 10, dtype=torch.float64, generator=gen)

    def run(model, dtype):
        y = model(x.to(dtype))
        y.backward(upstream.to(dtype))
        return y.detach().double(), [p.grad.double() for p in model.parameters()]

    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max())

    y64, g64 = run(copy.deepcopy(reference), torch.float64)
    errors = {}
    for name, precision in (("torch", None), ("pycnn default", "default"), ("pycnn high", "high")):
        model = copy.deepcopy(reference).float()
        if precision is not None:
            model, _ = pt.accelerate(model, precision=precision)
        y, g = run(model, torch.float32)
        errors[name] = {"logits": relative(y, y64),
                        "gradients": max(float((a - b).norm() / b.norm()) for a, b in zip(g, g64))}
    return errors


# =========================================================================== the parent

def _run_worker(task: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)],
                          capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {task['variant']} failed (status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _initial_weights(seed: int, dtype_name: str, path: str) -> None:
    """Weights drawn once, torch's initialisation (torch.manual_seed); no kernel runs here."""
    import torch
    torch.manual_seed(seed)
    model = build_model("torch", getattr(torch, dtype_name))
    torch.save(model.state_dict(), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10000, help="training images (one epoch over them)")
    parser.add_argument("--test", type=int, default=2000, help="test images for the accuracy after the epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps on a copy of the model")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--float32-error", action="store_true",
                        help="only the float32 error against float64 of torch and of accelerate's precisions")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.float32_error:
        for name, error in float32_error(args.seed).items():
            print(f"{name:<14} max relative error vs float64: logits {error['logits']:.2e}, "
                  f"gradients {error['gradients']:.2e}")
        return 0
    if not os.path.isfile(os.path.join(data_dir(), "train.npz")):
        print(f"skipped: CIFAR-10 not found at {data_dir()} (set PYCNN_CIFAR10_DIR)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "initial.pt")
        _initial_weights(args.seed, args.dtype, weights)
        base = {"data": data_dir(), "train": args.train, "test": args.test, "batch": args.batch, "lr": args.lr,
                "threads": args.threads, "warmup": args.warmup, "dtype": args.dtype, "seed": args.seed,
                "weights": weights}
        runs = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                result = _run_worker(dict(base, variant=variant))
                runs[variant].append(result)
                print(f"round {r + 1}: {variant:<6} {result['images_per_s']:8.1f} img/s  "
                      f"{result['seconds']:6.2f} s  final loss {result['losses'][-1]:.4f}  "
                      f"test acc {result['test_accuracy']:.3f}  load {result['loadavg']}", flush=True)

    ours, theirs = runs["pycnn"][0]["losses"], runs["torch"][0]["losses"]
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    repeat = {v: max(max(abs(a - b) for a, b in zip(runs[v][0]["losses"], run["losses"])) for run in runs[v])
              for v in VARIANTS}
    speed = {v: statistics.median(run["images_per_s"] for run in runs[v]) for v in VARIANTS}
    per_round = [p["images_per_s"] / t["images_per_s"] for p, t in zip(runs["pycnn"], runs["torch"])]
    summary = {
        "steps": len(ours), "images": len(ours) * args.batch, "batch": args.batch, "dtype": args.dtype,
        "threads": args.threads, "rounds": args.rounds,
        "loss_max_relative_difference": max(rel),
        "loss_relative_difference_first_10_steps": max(rel[:10]),
        "loss_relative_difference_by_quarter": [max(rel[i * len(rel) // 4:(i + 1) * len(rel) // 4]) for i in range(4)],
        "final_loss": {"pycnn": ours[-1], "torch": theirs[-1]},
        "test_accuracy": {v: runs[v][0]["test_accuracy"] for v in VARIANTS},
        "same_trajectory_every_round": repeat,
        "images_per_s_median": speed, "speed_ratio_of_medians": speed["pycnn"] / speed["torch"],
        "speed_ratio_median_per_round": statistics.median(per_round),
        "libraries": {v: runs[v][0]["libraries"] for v in VARIANTS},
        "pycnn_imported_in_torch_worker": runs["torch"][0]["pycnn_imported"],
    }
    print(f"\n{summary['images']} images ({summary['steps']} steps of {args.batch}), {args.dtype}, "
          f"{args.threads} threads, {args.rounds} rounds")
    print(f"loss trajectory, pycnn vs torch: max relative difference {summary['loss_max_relative_difference']:.2e} "
          f"(first 10 steps {summary['loss_relative_difference_first_10_steps']:.2e}; by quarter "
          + ", ".join(f"{q:.1e}" for q in summary["loss_relative_difference_by_quarter"]) + ")")
    print(f"final loss: pycnn {ours[-1]:.4f}, torch {theirs[-1]:.4f}; test accuracy: pycnn "
          f"{summary['test_accuracy']['pycnn']:.3f}, torch {summary['test_accuracy']['torch']:.3f}")
    print(f"img/s (median): pycnn {speed['pycnn']:.1f}, torch {speed['torch']:.1f}; ratio pycnn/torch "
          f"{summary['speed_ratio_of_medians']:.3f} "
          f"(median of per-round ratios {summary['speed_ratio_median_per_round']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
