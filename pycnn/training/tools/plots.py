"""Figures of the tools: a search (accuracy against each searched setting, the best trials'
curves), an ensemble (reliability diagram) and the imbalance report (per-class accuracy,
confusion matrices)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pycnn.training import figures
from pycnn.training.figures import zoom


def _pyplot():
    return figures._pyplot()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def search_figures(rows: list, curves: list, space: dict, out_dir) -> list:
    """search_scatter.png and search_curves.png in ``out_dir``; returns their paths.

    ``rows``: results rows (stage, status, val_accuracy and the sampled settings); ``curves``:
    (TrialSpec, per-epoch rows) pairs; ``space``: key -> Dist (log axes for log-uniform keys)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    keys = [k for k in space if any(_is_number(r.get(k)) for r in rows)]
    pair = ("lr", "weight_decay") if {"lr", "weight_decay"} <= set(keys) else None
    panels = len(keys) + (pair is not None) or 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    stages = sorted({r["stage"] for r in rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    scores = [r["val_accuracy"] for r in rows if r["val_accuracy"] is not None]
    for ax, key in zip(axes[0], keys):
        for stage in stages:
            done = [r for r in rows if r["stage"] == stage and r[key] is not None]
            ok = [r for r in done if r["status"] == "finished" and r["val_accuracy"] is not None]
            cut = [r for r in done if r["status"] != "finished" and r["val_accuracy"] is not None]
            colour = colours[(stage - 1) % len(colours)]
            ax.scatter([r[key] for r in ok], [r["val_accuracy"] for r in ok], color=colour, s=22,
                       label=f"stage {stage}")
            ax.scatter([r[key] for r in cut], [r["val_accuracy"] for r in cut], color=colour, marker="x",
                       s=22, label=f"stage {stage}, cut early" if cut else None)
        diverged = [r for r in rows if r[key] is not None and r["val_accuracy"] is None]
        if diverged:  # no accuracy to plot: a strip of their own along the bottom, not at accuracy 0
            ax.scatter([r[key] for r in diverged], [0.03] * len(diverged), marker="v", color="red", s=22,
                       transform=ax.get_xaxis_transform(), clip_on=False,
                       label=f"diverged ({len(diverged)}, no accuracy)")
        ax.set_ylim(*zoom(scores))
        if space[key].kind == "log_uniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy (best epoch)")
        ax.grid(alpha=0.3)
    if keys:
        axes[0][0].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "no numeric setting searched", ha="center", va="center")
    if pair is not None:
        ax = axes[0][len(keys)]
        scored = [r for r in rows if r["val_accuracy"] is not None]
        points = ax.scatter([r["lr"] for r in scored], [r["weight_decay"] for r in scored],
                            c=[r["val_accuracy"] for r in scored], cmap="viridis", s=30,
                            marker="o", edgecolors="none")
        failed = [r for r in rows if r["val_accuracy"] is None]
        ax.scatter([r["lr"] for r in failed], [r["weight_decay"] for r in failed], marker="x", color="red",
                   s=22, label="diverged")
        fig.colorbar(points, ax=ax, label="validation accuracy")
        for key, setter in (("lr", ax.set_xscale), ("weight_decay", ax.set_yscale)):
            if space[key].kind == "log_uniform":
                setter("log")
        ax.set_xlabel("lr")
        ax.set_ylabel("weight_decay (reg)")
        if failed:
            ax.legend(fontsize=7)
    fig.suptitle("random search: validation accuracy of every trial")
    scatter = figures.save(fig, out_dir / "search_scatter.png", dpi=110)

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    ranked = sorted(((s, c) for s, c in curves if c and any(r["val_accuracy"] is not None for r in c)),
                    key=lambda sc: -max(r["val_accuracy"] or 0 for r in sc[1]))[:6]
    for spec, curve in ranked:
        label = f"s{spec.stage} t{spec.index}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.values.items())
        epochs = [r["epoch"] for r in curve]
        acc_ax.plot(epochs, [r["val_accuracy"] for r in curve], marker="o", label=label)
        loss_ax.plot(epochs, [r["train_loss"] for r in curve], marker="o", label=label)
    acc_ax.set_ylabel("validation accuracy")
    loss_ax.set_ylabel("training loss (data + regularisation)")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(figures._ticker().MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=6)
    fig.suptitle("the best trials")
    curves_path = figures.save(fig, out_dir / "search_curves.png", dpi=110)
    return [scatter, curves_path]


def reliability(confidence, correct, bins: int, path, title: str) -> Path:
    """A reliability diagram: accuracy against confidence per bin (the diagonal is calibrated)."""
    plt = _pyplot()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    centres, accs, counts = [], [], []
    for b in range(bins):
        inside = which == b
        if inside.any():
            centres.append(confidence[inside].mean())
            accs.append(correct[inside].mean())
            counts.append(inside.sum())
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    ax.scatter(centres, accs, s=[10 + 200 * c / max(counts) for c in counts], label="bins (size: images)")
    ax.plot(centres, accs)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    figures.save(fig, path, dpi=110)
    return Path(path)


def per_class(accuracies: dict, counts: list, names: list, path) -> Path:
    """Per-class test accuracy of each remedy (bars), with the training images per class."""
    plt = _pyplot()
    k, n = len(names), len(accuracies)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * k + 2), 3.8))
    width = 0.8 / max(n, 1)
    for i, (label, acc) in enumerate(accuracies.items()):
        ax.bar(np.arange(k) + (i - (n - 1) / 2) * width, acc, width,
               label=f"{label} (mean {np.mean(acc):.3f})")
    ax.set_xticks(range(k), [f"{name}\n{c}" for name, c in zip(names, counts)], fontsize=7)
    ax.set_ylabel("test accuracy of the class")
    ax.set_xlabel("class (training images)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    figures.save(fig, path, dpi=110)
    return Path(path)
