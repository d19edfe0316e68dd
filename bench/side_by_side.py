"""pycnn and PyTorch CPU side by side, each framework in its own process.

Training-step throughput of the README's CIFAR-10 net (VGG-style, widths 32/64/128, two
3x3 conv + BN + ReLU per stage, dropout 0.25, linear; SGD with Nesterov momentum, weight
decay on weights only) at batch 64 and 128, and the loss / test-accuracy trajectory of both
from the same initial weights and the same augmented batches.

    python bench/side_by_side.py --quick             # a short check, a few minutes
    python bench/side_by_side.py --json sbs.json     # 10 rounds; 3 epochs on 10,000 images
    python bench/side_by_side.py --epochs 0 --variant passive:OMP_WAIT_POLICY=passive \
        --variant head:path=/tmp/pycnn-head          # more pycnn rows: other settings/checkouts

How it measures:
* each framework (and each variant) runs in worker processes of its own (``--worker``),
  one per batch size, that import that framework only (the torch worker uses pycnn's data
  modules, never its kernels; each worker reports the OpenMP/BLAS libraries mapped into
  it), so the two never share an OpenMP runtime or a BLAS pool; each uses ``--threads``
  threads (default 2);
* throughput: every worker starts and warms up (``--warmup`` steps) one after the other,
  then the parent asks them in turn, one at a time, for a block of ``--steps`` timed steps,
  ``--repeats`` rounds in an order rotated every round, so that the changing load of a
  shared machine falls on all alike.  Batches are made before timing and cycled
  (``--loader``: pycnn's prefetching DataLoader runs alongside the steps instead).  The
  table gives median img/s, the median of the per-round ratios and the 1-minute load
  average (/proc/loadavg) seen at the blocks;
* trajectory: ``--epochs`` epochs on the first ``--train`` training images (flips, pad-4
  crops, per-channel standardisation; batches seeded by (seed, epoch), identical in both
  workers, checked by a hash), cosine learning rate per epoch, the mean training loss and
  the test accuracy on ``--test`` images after every epoch.  Dropout masks come from each
  framework's own generator, so the curves agree statistically, not bit for bit.

A variant ``LABEL:KEY=VALUE,...`` runs the pycnn worker again with those environment
variables; the key ``path`` puts another checkout of pycnn first on PYTHONPATH (e.g. a
``git worktree`` of an older commit, with its built extension).

Needs torch (``pip install torch==2.13.0``) and ../shared/data/cifar10 (or
PYCNN_CIFAR10_DIR).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # run as a script or imported as bench.<name>: machine.py beside it
from machine import loadavg, mapped_libraries  # noqa: E402

# ======================================================================= the worker process

def _digest(arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _data(task, limit):
    """(train loader, test images and labels, preprocessor) from pycnn's data modules."""
    from pycnn import data
    from pycnn.data import augment, datasets, preprocess
    train_x, train_y = datasets.cifar10_shared("train")
    train_x, train_y = train_x[:limit], train_y[:limit]
    norm = preprocess.Standardise(per="channel").fit(train_x)
    transform = augment.Compose([augment.RandomFlip(), augment.RandomCrop(padding=4), norm])
    loader = data.DataLoader((train_x, train_y), task["batch_size"], shuffle=True, seed=task["seed"],
                             transform=transform, drop_last=True, prefetch=2 if task["loader"] else 0)
    test = None
    if task.get("test"):
        test_x, test_y = datasets.cifar10_shared("test")
        test = (norm(test_x[:task["test"]]).astype("float32"), test_y[:task["test"]])
    return loader, test


def _initial_model(task):
    """The pycnn model with the seed's initial weights (NumPy only, no kernel runs)."""
    from pycnn import models
    widths = tuple(task["widths"])
    return models.vgg(3, 32, 10, widths=widths, convs_per_stage=task["convs_per_stage"],
                      dropout=task["dropout"], rng=__import__("numpy").random.default_rng(task["seed"]))


class _PycnnNet:
    def __init__(self, task):
        import pycnn
        from pycnn import optim
        self.pycnn = pycnn
        pycnn.manual_seed(task["seed"])
        self.model = _initial_model(task)
        groups = optim.param_groups(self.model, weight_decay=task["weight_decay"])
        self.opt = optim.SGD(groups, lr=task["lr"], momentum=0.9, nesterov=True)
        C = pycnn.device.cpp_extension()
        if C is not None:
            C.set_num_threads(task["threads"])

    def weights_digest(self):
        return _digest(p.data for _, p in self.model.named_parameters())

    def set_lr(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, x, y):
        import pycnn.functional as F
        loss = F.softmax_cross_entropy(self.model(self.pycnn.Tensor(x)), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.data)

    def accuracy(self, x, y, batch=500):
        self.model.eval()
        correct = 0
        with self.pycnn.no_grad():
            for i in range(0, len(y), batch):
                correct += int((self.model(self.pycnn.Tensor(x[i:i + batch])).data.argmax(1) == y[i:i + batch]).sum())
        self.model.train()
        return correct / len(y)

    def info(self):
        threads = getattr(self.pycnn, "threads", None)
        return {"pycnn_file": self.pycnn.__file__, "threads": dict(threads()) if threads else None}


class _TorchNet:
    def __init__(self, task):
        import torch
        self.torch = torch
        torch.set_num_threads(task["threads"])
        torch.manual_seed(task["seed"])
        self.model = self._twin(_initial_model(task))
        decayed = [p for p in self.model.parameters() if p.ndim > 1]
        others = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.SGD([{"params": decayed, "weight_decay": task["weight_decay"]}, {"params": others}],
                                   lr=task["lr"], momentum=0.9, nesterov=True)

    def _twin(self, model):
        """A torch.nn.Sequential with the layers and weights of a pycnn vgg model."""
        from pycnn import nn as pnn
        torch, layers = self.torch, []
        for layer in model:
            if isinstance(layer, pnn.Conv3x3):
                conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1,
                                       bias=layer.bias is not None)
                conv.weight.data = torch.tensor(layer.weight.data)
                if layer.bias is not None:
                    conv.bias.data = torch.tensor(layer.bias.data)
                layers.append(conv)
            elif isinstance(layer, pnn.BatchNorm):
                bn = torch.nn.BatchNorm2d(layer.weight.shape[0], eps=layer.eps, momentum=layer.momentum)
                bn.weight.data, bn.bias.data = torch.tensor(layer.weight.data), torch.tensor(layer.bias.data)
                layers.append(bn)
            elif isinstance(layer, pnn.ReLU):
                layers.append(torch.nn.ReLU())
            elif isinstance(layer, pnn.MaxPool2):
                layers.append(torch.nn.MaxPool2d(2))
            elif isinstance(layer, pnn.Flatten):
                layers.append(torch.nn.Flatten())
            elif isinstance(layer, pnn.Dropout):
                layers.append(torch.nn.Dropout(layer.p))
            elif isinstance(layer, pnn.Linear):
                linear = torch.nn.Linear(layer.in_features, layer.out_features)
                linear.weight.data = torch.tensor(layer.weight.data)
                linear.bias.data = torch.tensor(layer.bias.data)
                layers.append(linear)
            else:
                raise TypeError(f"no torch twin for {layer!r}")
        return torch.nn.Sequential(*layers)

    def weights_digest(self):
        # pycnn's named_parameters order: per layer weight then bias, as torch's
        return _digest(p.detach().numpy() for p in self.model.parameters())

    def set_lr(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, x, y):
        torch = self.torch
        loss = torch.nn.functional.cross_entropy(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss)

    def accuracy(self, x, y, batch=500):
        torch = self.torch
        self.model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y), batch):
                correct += int((self.model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
        self.model.train()
        return correct / len(y)

    def info(self):
        return {"torch_version": self.torch.__version__, "torch_threads": self.torch.get_num_threads(),
                "pycnn_kernels_loaded": "pycnn._C" in sys.modules}


def _batches(task):
    """An endless stream of training batches: a pool made before the clock starts (cycled),
    or with ``loader`` pycnn's DataLoader prefetching live, epoch after epoch."""
    pool = task["pool"]
    loader, _ = _data(task, pool * task["batch_size"])
    if not task["loader"]:
        batches = list(loader)
        while True:
            yield from batches
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _serve_throughput(net, task, out):
    """Warm up, then time ``run N`` requests (N steps each) read from stdin until ``quit``."""
    batches = _batches(task)
    x, y = next(batches)
    info = {"weights": net.weights_digest(), "first_batch": _digest([x, y])}
    net.step(x, y)
    for _ in range(task["warmup"] - 1):
        net.step(*next(batches))
    info.update(net.info(), libraries=mapped_libraries())
    out("READY " + json.dumps(info))
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            return
        steps, times, losses = int(command[1]), [], []
        load = loadavg()
        start = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            t = time.perf_counter()
            losses.append(net.step(x, y))
            times.append(time.perf_counter() - t)
        seconds = time.perf_counter() - start
        out("RESULT " + json.dumps({"images_per_s": steps * task["batch_size"] / seconds, "seconds": seconds,
                                    "median_step_ms": 1e3 * statistics.median(times), "loss": losses[-1],
                                    "loadavg": load}))


def _trajectory(net, task, out):
    loader, (test_x, test_y) = _data(task, task["train"])
    epochs, epochs_done, first = task["epochs"], [], None
    for epoch in range(epochs):
        net.set_lr(task["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))
        loader.set_epoch(epoch)
        losses, start = [], time.perf_counter()
        for x, y in loader:
            if first is None:
                first = _digest([x, y])
            losses.append(net.step(x, y))
        seconds = time.perf_counter() - start
        epochs_done.append({"epoch": epoch + 1, "seconds": seconds,
                            "images_per_s": len(losses) * task["batch_size"] / seconds,
                    "mean_loss": sum(losses) / len(losses), "losses": losses,
                    "test_accuracy": net.accuracy(test_x, test_y), "loadavg": loadavg()})
        out(f"EPOCH {task['framework']} epoch {epoch + 1}/{epochs}: loss {epochs_done[-1]['mean_loss']:.4f}, "
            f"test accuracy {epochs_done[-1]['test_accuracy']:.4f}, {epochs_done[-1]['images_per_s']:.1f} img/s")
    return {"epochs": epochs_done, "first_batch": first}


def worker(task: dict) -> None:
    def out(line):
        print(line, flush=True)
    net = (_PycnnNet if task["framework"] == "pycnn" else _TorchNet)(task)
    if task["mode"] == "throughput":
        _serve_throughput(net, task, out)
    else:
        weights = net.weights_digest()
        result = _trajectory(net, task, out)
        result.update(net.info(), weights=weights, libraries=mapped_libraries())
        out("RESULT " + json.dumps(result))


# ======================================================================= the parent process

class _Worker:
    """A worker process of one framework (and environment), driven through stdin/stdout."""

    def __init__(self, task, env_extra, path=None):
        env = dict(os.environ)
        shared = os.path.join(HERE, os.pardir, os.pardir, "shared", "data", "cifar10")
        if "PYCNN_CIFAR10_DIR" not in env and os.path.isdir(shared):
            env["PYCNN_CIFAR10_DIR"] = os.path.abspath(shared)  # also for a variant's checkout elsewhere
        env.update(env_extra)
        if path:
            env["PYTHONPATH"] = os.pathsep.join([path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.task = task
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)

    def read(self, tag):
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
            if line.startswith("EPOCH "):
                print("  " + line[len("EPOCH "):].rstrip(), flush=True)
        self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"worker {self.task['framework']} failed (exit {self.proc.returncode}):\n"
                           f"{self.stderr.read()[-3000:]}")

    def run(self, steps):
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self.read("RESULT")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


def _parse_variant(text):
    label, _, spec = text.partition(":")
    if not label or not spec:
        raise argparse.ArgumentTypeError(f"a variant is LABEL:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    env, path = {}, None
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r} in variant {label!r} is not KEY=VALUE")
        if key == "path":
            path = os.path.abspath(value)
        else:
            env[key] = value
    return {"label": label, "framework": "pycnn", "env": env, "path": path}


def _median(values):
    return statistics.median(values) if values else float("nan")


def _throughput_study(args, base, rows, batch_sizes, results):
    """Interleaved blocks of timed steps in one long-lived worker per row and batch size."""
    workers, runs = {}, {(r["label"], b): [] for r in rows for b in batch_sizes}
    try:
        for b in batch_sizes:
            for row in rows:
                task = dict(base, framework=row["framework"], mode="throughput", batch_size=b,
                            warmup=args.warmup, pool=args.pool)
                w = _Worker(task, row["env"], row["path"])
                workers[(row["label"], b)] = w
                w.info = w.read("READY")     # one at a time: start-up and warm-up are not timed
        order = [(r["label"], b) for b in batch_sizes for r in rows]
        for rep in range(args.repeats):
            shift = rep % len(order)
            for key in order[shift:] + order[:shift]:
                out = workers[key].run(args.steps)
                out.update(label=key[0], batch_size=key[1], round=rep)
                runs[key].append(out)
                results["throughput"].append(out)
                print(f"  round {rep + 1}/{args.repeats} batch {key[1]:4d} {key[0]:<10} "
                      f"{out['images_per_s']:7.1f} img/s"
                      f"  (load {out['loadavg']:.2f})", flush=True)
    finally:
        for w in workers.values():
            w.close()

    print(f"\ntraining-step throughput, img/s (median of {args.repeats} interleaved blocks of {args.steps} steps"
          f"{', DataLoader prefetching' if args.loader else ', batches in memory'})")
    header = f"{'batch':>5} " + " ".join(f"{r['label']:>10}" for r in rows)
    ref = "torch" if not args.no_torch else "pycnn"
    others = [r["label"] for r in rows if r["label"] != ref]
    header += " " + " ".join(f"{lab + '/' + ref:>16}" for lab in others) + "   load avg"
    print(header)
    summary = []
    for b in batch_sizes:
        med = {r["label"]: _median([o["images_per_s"] for o in runs[(r["label"], b)]]) for r in rows}
        ratios = {}
        for lab in others:
            per_rep = [o["images_per_s"] / t["images_per_s"]
                       for o, t in zip(runs[(lab, b)], runs[(ref, b)])]
            ratios[lab] = _median(per_rep)
        loads = [o["loadavg"] for r in rows for o in runs[(r["label"], b)] if o["loadavg"] is not None]
        load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "?"
        print(f"{b:5d} " + " ".join(f"{med[r['label']]:10.1f}" for r in rows) + " "
              + " ".join(f"{ratios[lab]:15.2f}x" for lab in others) + f"   {load}")
        summary.append({"batch_size": b, "median_images_per_s": med, f"median_ratio_over_{ref}": ratios,
                        "loadavg_range": load})
    results["summary"] = summary

    # ---- honesty checks: same weights and batches everywhere, separate runtimes
    infos = {key: w.info for key, w in workers.items()}
    same = len({(i["weights"], i["first_batch"]) for (_, b), i in infos.items() if b == batch_sizes[0]}) == 1
    print(f"same initial weights and first batch in every worker: {'yes' if same else 'NO'}")
    for r in rows:
        info = infos[(r["label"], batch_sizes[0])]
        extra = ""
        if r["framework"] == "torch":
            extra = f"; pycnn kernels loaded: {info.get('pycnn_kernels_loaded')}"
        elif info.get("threads"):
            omp = info["threads"]["openmp"]
            extra = f"; OpenMP {omp['num_threads']} threads, {omp['wait_policy']}"
        else:
            extra = f"; pycnn from {info.get('pycnn_file')}"
        print(f"  {r['label']}: libraries {[os.path.basename(p) for p in info['libraries']]}{extra}")
    results["workers"] = {f"{lab} batch {b}": i for (lab, b), i in infos.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of 8 steps, trajectory of 1 epoch on 2,560 images (a short check)")
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--repeats", type=int, help="rounds: timed blocks per worker, interleaved (10; quick 3)")
    parser.add_argument("--steps", type=int, help="training steps per timed block (20; quick 8)")
    parser.add_argument("--warmup", type=int, help="untimed steps when a worker starts (5; quick 3)")
    parser.add_argument("--pool", type=int, default=16, help="batches made before timing and cycled")
    parser.add_argument("--loader", action="store_true",
                        help="throughput with pycnn's prefetching DataLoader running alongside the steps")
    parser.add_argument("--train", type=int, help="trajectory: training images, the first N (10000; quick 2560)")
    parser.add_argument("--test", type=int, help="trajectory: test images, the first N (10000; quick 2000)")
    parser.add_argument("--epochs", type=int, help="trajectory: epochs, 0 for none (3; quick 1)")
    parser.add_argument("--trajectory-batch", type=int, default=64)
    parser.add_argument("--widths", default="32,64,128")
    parser.add_argument("--convs-per-stage", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.25)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2, help="threads per framework")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="pycnn rows only (e.g. to compare variants)")
    parser.add_argument("--variant", action="append", type=_parse_variant, default=[],
                        help="LABEL:KEY=VALUE,... an extra pycnn row with these environment variables "
                             "(key 'path': another pycnn checkout first on PYTHONPATH)")
    parser.add_argument("--json", help="write every run's results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(json.loads(args.worker))
        return
    defaults = dict(repeats=3, steps=8, warmup=3, train=2560, test=2000, epochs=1) if args.quick else \
        dict(repeats=10, steps=20, warmup=5, train=10000, test=10000, epochs=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    base = {"widths": [int(w) for w in args.widths.split(",")], "convs_per_stage": args.convs_per_stage,
            "dropout": args.dropout, "lr": args.lr, "weight_decay": args.weight_decay, "threads": args.threads,
            "seed": args.seed, "loader": args.loader}
    rows = [{"label": "pycnn", "framework": "pycnn", "env": {}, "path": None}]
    if not args.no_torch:
        rows.append({"label": "torch", "framework": "torch", "env": {}, "path": None})
    rows += args.variant
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    env_shown = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "OPENBLAS_", "MKL_"))}
    print(f"one process per framework/variant and batch size, {args.threads} threads each; "
          f"environment: {env_shown or 'no OMP/BLAS variables'}")
    results = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "throughput": [], "trajectory": {}}

    if args.repeats > 0:
        _throughput_study(args, base, rows, batch_sizes, results)

    # ---- trajectory
    if args.epochs > 0:
        print(f"\ntrajectory: {args.epochs} epoch(s) on {args.train} images, batch {args.trajectory_batch}, "
              f"test on {args.test}; same initial weights and batches")
        traj_rows = [r for r in rows if r["label"] in ("pycnn", "torch")]
        for r in traj_rows:
            task = dict(base, framework=r["framework"], mode="train", batch_size=args.trajectory_batch,
                        train=args.train, test=args.test, epochs=args.epochs)
            w = _Worker(task, r["env"], r["path"])
            try:
                results["trajectory"][r["label"]] = w.read("RESULT")
            finally:
                w.close()
        print(f"{'epoch':>5} " + " ".join(f"{lab + ' ' + what:>15}" for lab in results["trajectory"]
                                          for what in ("loss", "acc", "img/s")))
        for e in range(args.epochs):
            cells = []
            for t in results["trajectory"].values():
                ep = t["epochs"][e]
                cells += [f"{ep['mean_loss']:15.4f}", f"{ep['test_accuracy']:15.4f}", f"{ep['images_per_s']:15.1f}"]
            print(f"{e + 1:5d} " + " ".join(cells))
        trajs = list(results["trajectory"].values())
        if len(trajs) == 2:
            same = trajs[0]["weights"] == trajs[1]["weights"] and trajs[0]["first_batch"] == trajs[1]["first_batch"]
            first = [t["epochs"][0]["losses"][0] for t in trajs]
            print(f"same initial weights and batches: {'yes' if same else 'NO'}; "
                  f"first-step loss {first[0]:.5f} vs {first[1]:.5f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
