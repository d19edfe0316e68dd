"""pycnn and PyTorch CPU side by side on CIFAR-10: the same VGG-style network, the same
initial weights, the same batches and augmentation (one pycnn DataLoader feeds both),
the same optimiser (SGD, Nesterov momentum, weight decay on weights only) and the same
cosine schedule.  Prints test accuracy per epoch, seconds per epoch and their ratio, and
pycnn's time per op for the first epoch.

    python bench/side_by_side.py --train 10000 --epochs 3 --json side_by_side.json

Needs torch (pip install torch==2.13.0) and ../shared/data/cifar10.  Both use 2 threads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import numpy as np

import pycnn
from pycnn import nn as pnn
from pycnn.autograd import Tensor, no_grad
from pycnn.train import Config, build, load_data


def torch_twin(model, torch):
    """A torch.nn.Sequential with the layers and the current weights of a pycnn vgg model."""
    layers = []
    for layer in model:
        if isinstance(layer, pnn.Conv3x3):
            conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=layer.bias is not None)
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
            linear.weight.data, linear.bias.data = torch.tensor(layer.weight.data), torch.tensor(layer.bias.data)
            layers.append(linear)
        else:
            raise TypeError(f"no torch twin for {layer!r}")
    return torch.nn.Sequential(*layers)


def cosine_lr(base, epoch, epochs):
    return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10000, help="training images (the first N)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--widths", default="32,64,128")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)

    config = Config(dataset="cifar10", limit=args.train, widths=tuple(int(w) for w in args.widths.split(",")),
                    convs_per_stage=2, dropout=0.25, flip=True, crop_padding=4, schedule="cosine",
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_x, train_y, test_x, test_y = load_data(config)
    model, optimiser, schedule, train_loader, test_loader, _ = build(config, train_x, train_y, test_x, test_y)
    twin = torch_twin(model, torch)
    decayed = [p for p in twin.parameters() if p.ndim > 1]
    others = [p for p in twin.parameters() if p.ndim <= 1]
    torch_opt = torch.optim.SGD([{"params": decayed, "weight_decay": config.weight_decay}, {"params": others}],
                                lr=config.lr, momentum=config.momentum, nesterov=True)
    print(model)

    results = {"config": config.to_dict(), "pycnn": [], "torch": []}
    for epoch in range(args.epochs):
        # both see exactly the same augmented batches: the loader is seeded by (seed, epoch)
        for name in ("pycnn", "torch"):
            train_loader.set_epoch(epoch)
            timings = None
            start = time.perf_counter()
            if name == "pycnn":
                model.train()
                with (pycnn.profile() if epoch == 0 else contextlib.nullcontext()) as timings:
                    for images, labels in train_loader:
                        loss = pycnn.functional.softmax_cross_entropy(model(Tensor(images)), labels)
                        optimiser.zero_grad()
                        loss.backward()
                        optimiser.step()
                schedule.step_epoch(0.0)
            else:
                twin.train()
                for group in torch_opt.param_groups:
                    group["lr"] = cosine_lr(config.lr, epoch, args.epochs)
                for images, labels in train_loader:
                    loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(images)), torch.from_numpy(labels))
                    torch_opt.zero_grad()
                    loss.backward()
                    torch_opt.step()
            seconds = time.perf_counter() - start
            accuracy = evaluate(name, model, twin, test_loader, torch)
            results[name].append({"epoch": epoch + 1, "seconds": seconds, "test_accuracy": accuracy})
            print(f"epoch {epoch + 1} {name:<6} {seconds:7.1f} s  {len(train_y) / seconds:6.1f} images/s  "
                  f"test accuracy {accuracy:.4f}", flush=True)
            if timings is not None:
                print(timings.table(12))
                results["pycnn_profile_epoch1"] = timings.table(40)
    ratio = sum(r["seconds"] for r in results["pycnn"]) / sum(r["seconds"] for r in results["torch"])
    gap = results["pycnn"][-1]["test_accuracy"] - results["torch"][-1]["test_accuracy"]
    results.update(time_ratio_pycnn_over_torch=ratio, accuracy_gap_points=100 * gap)
    print(f"time per epoch pycnn / torch = {ratio:.2f}; final test accuracy pycnn - torch = {100 * gap:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def evaluate(name, model, twin, loader, torch):
    correct = seen = 0
    if name == "pycnn":
        model.eval()
        with no_grad():
            for images, labels in loader:
                correct += int((model(Tensor(images)).numpy().argmax(1) == labels).sum())
                seen += len(labels)
        model.train()
    else:
        twin.eval()
        with torch.no_grad():
            for images, labels in loader:
                correct += int((twin(torch.from_numpy(images)).argmax(1).numpy() == labels).sum())
                seen += len(labels)
    return correct / seen


if __name__ == "__main__":
    main()
