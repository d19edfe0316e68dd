"""pycnn inside a PyTorch training loop: the same CIFAR-10 model in pure torch and with
pycnn's convolutions, pools and activations (``pycnn.torch``), side by side.

    python bench/torch_embed.py                      # 10,000 images, batch 64, 3 rounds
    python bench/torch_embed.py --train 2000 --dtype float64 --rounds 1   # rounding-level match

The model: a small VGG-style net, widths 16/32/64, each stage conv3x3 + BatchNorm (torch's in
both variants) + ReLU + 2x2 max pool, then flatten and a linear layer (torch's).  Variant
``torch`` uses torch.nn.Conv2d / ReLU / MaxPool2d; variant ``pycnn`` uses pycnn.torch.Conv3x3 /
ReLU / MaxPool2, whose forward and backward run pycnn's C++ kernels on the tensors' memory.

How it measures:
* initial weights are drawn once (pycnn's He initialisation, ``--seed``) and saved; both
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
    """conv3x3 + BN + ReLU + maxpool per width, flatten, linear: (N, 3, 32, 32) -> (N, 10)."""
    import torch
    nn = torch.nn
    layers, c_in = [], 3
    for width in WIDTHS:
        if variant == "pycnn":
            import pycnn.torch as pt
            layers += [pt.Conv3x3(c_in, width, dtype=dtype), nn.BatchNorm2d(width, dtype=dtype), pt.ReLU(),
                       pt.MaxPool2()]
        else:
            layers += [nn.Conv2d(c_in, width, 3, padding=1, dtype=dtype), nn.BatchNorm2d(width, dtype=dtype),
                       nn.ReLU(), nn.MaxPool2d(2)]
        c_in = width
    side = 32 // 2 ** len(WIDTHS)
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, 10, dtype=dtype)]
    return nn.Sequential(*layers)


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
    """Weights drawn once: pycnn's He initialisation for the convs (pycnn.manual_seed), torch's
    defaults for BN and the linear layer (torch.manual_seed); no kernel runs here."""
    import torch

    import pycnn
    torch.manual_seed(seed)
    pycnn.manual_seed(seed)
    model = build_model("pycnn", getattr(torch, dtype_name))
    torch.save(model.state_dict(), path)
    assert list(model.state_dict()) == list(build_model("torch", getattr(torch, dtype_name)).state_dict())


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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
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
