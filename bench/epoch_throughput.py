"""The whole epoch against the bare step: how much of the training step's speed ``pycnn train``
keeps once loading and augmentation run alongside it (issue 10, part 3).

    python bench/epoch_throughput.py                   # batch 64 and 128, 3 rounds
    python bench/epoch_throughput.py --images 2560 --rounds 2 --json out.json

One process, pycnn only.  For each batch size it builds the run of ``pycnn train`` (the
README's CIFAR-10 net, VGG-style widths 32/64/128 with two conv+BN+ReLU per stage, SGD
Nesterov; flips, pad-4 crops and fancy PCA; the prefetching DataLoader) on the first
``--images`` training images, then alternates, ``--rounds`` times:

* bare step: ``--steps`` steps of forward, loss, backward and optimizer on batches made before
  the clock starts (the same augmented batches the loader gives), as bench/side_by_side.py
  times them;
* epoch: one epoch of ``Trainer.fit`` (tqdm off), i.e. what ``pycnn train`` does per epoch,
  loading and augmenting included, validation excluded (it is not training throughput).

It prints the median img/s of each and their ratio (epoch / bare step: the target is >= 0.9),
with the 1-minute load average, since the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _loadavg() -> float:
    return os.getloadavg()[0]


def measure(batch: int, images: int, rounds: int, steps: int, fancy_pca: float, prefetch: int) -> dict:
    import numpy as np

    import pycnn
    import pycnn.functional as F
    from pycnn.training.config import Config
    from pycnn.training.pipeline import build, split_data
    from pycnn.training.trainer import Trainer

    config = Config(dataset="cifar10", limit=images, val_size=0, flip=True, crop_padding=4, fancy_pca=fancy_pca,
                    widths=(32, 64, 128), convs_per_stage=2, batch_size=batch, epochs=1000, lr=0.01,
                    schedule="none", prefetch=prefetch, diagnostics_every=0)
    splits = split_data(config)
    model, optimizer, schedule, loader, _, _ = build(config, splits.train_x, splits.train_y,
                                                     classes=splits.classes)
    trainer = Trainer(model, optimizer, loader, schedule=schedule, progress=False)
    pool = [b for _, b in zip(range(16), iter(loader))]  # the loader's own batches, made once

    def bare_step(x, y):
        loss = F.softmax_cross_entropy(model(pycnn.Tensor(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for x, y in pool[:3]:  # warm-up
        bare_step(x, y)
    bare, epoch, loads = [], [], []
    for _ in range(rounds):
        model.train()
        start = time.perf_counter()
        for i in range(steps):
            bare_step(*pool[i % len(pool)])
        bare.append(steps * batch / (time.perf_counter() - start))
        history = trainer.fit(trainer.epoch + 1)
        epoch.append(history["images_per_second"][-1])
        loads.append(_loadavg())
    ratios = [e / b for e, b in zip(epoch, bare)]
    return {"batch": batch, "images": len(splits.train_y), "bare_img_s": statistics.median(bare),
            "epoch_img_s": statistics.median(epoch), "ratio": statistics.median(ratios),
            "rounds": {"bare": bare, "epoch": epoch}, "load": statistics.median(loads),
            "openmp": pycnn.threads()["openmp"],
            "fancy_pca": fancy_pca, "prefetch": prefetch, "numpy": np.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--images", type=int, default=5120, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="bare steps per round")
    parser.add_argument("--fancy-pca", type=float, default=0.1)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = measure(batch, args.images, args.rounds, args.steps, args.fancy_pca, args.prefetch)
        rows.append(row)
        print(f"batch {batch:4d}: bare step {row['bare_img_s']:7.0f} img/s, epoch {row['epoch_img_s']:7.0f} img/s, "
              f"epoch/step {row['ratio']:.2f} (load {row['load']:.1f}, {row['images']} images)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
