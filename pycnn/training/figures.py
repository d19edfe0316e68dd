"""Diagnostic figures of a training run (CS231n lecture 6):

* ``loss.png``: the loss per batch (data + regularisation, and the data loss alone) with a
  running mean — its shape tells a learning rate too high, too low or about right;
* ``accuracy.png``: train / validation accuracy per epoch (their gap tells overfitting), the
  best epoch and the test accuracy measured once at the end;
* ``lr.png``: the learning rate per batch (warm-up, steps, cosine, plateau cuts);
* ``layers.png`` (when the run has per-layer diagnostics): activation std, dead units,
  gradient norms and update / weight ratios per layer over the steps.

A run that stopped before a batch finished still gets its figures, saying so."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pycnn.training.diagnostics import series


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def _ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _log_scale(ax) -> None:
    """A log y axis labelled with plain numbers (2, 3, 0.5) instead of 2x10^0; the minor ticks
    2, 3 and 5 of each decade are labelled too where the axis spans less than two decades."""
    ticker = _ticker()
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    some = ticker.FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in "235" else "")
    ax.yaxis.set_minor_formatter(some if high / low < 100 else ticker.NullFormatter())


def save(fig, path: Path, dpi: int = 100, rect=(0, 0, 1, 1)) -> Path:
    """Lay out (within ``rect`` of the figure), write and close ``fig``; its path."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet: the run stopped before one finished", ha="center", va="center",
            transform=ax.transAxes)


def _note_stop(ax, history: dict) -> None:
    for key, label in (("stopped", "diverged"), ("early_stopped", "early stop"), ("interrupted", "interrupted")):
        if history.get(key):
            ax.set_title(f"{ax.get_title()} ({label})")


def zoom(values, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """Axis limits that fit VALUES with a margin (a tenth of their span, at least 0.02),
    within [low, high]: curves of 0.95-0.99 are not squashed against the top of 0-1."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return low, high
    least, most = min(values), max(values)
    margin = max(0.02, 0.1 * (most - least))
    return max(low, least - margin), min(high, most + margin)


def plot_history(history: dict, out_dir) -> list[Path]:
    """Write loss.png, accuracy.png and lr.png into ``out_dir``; returns their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    losses = np.asarray(history.get("batch_loss", []), dtype=float)
    data_losses = np.asarray(history.get("batch_data_loss", []), dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set(xlabel="batch", ylabel="loss", title="Training loss per batch")
    finite = np.isfinite(losses)
    if finite.any():
        steps = np.arange(1, len(losses) + 1)
        shown = np.where(finite, losses, np.nan)
        ax.plot(steps, shown, lw=0.6, alpha=0.5, label="loss (data + regularisation)")
        if len(data_losses) == len(losses) and not np.allclose(data_losses, losses, equal_nan=True):
            ax.plot(steps, np.where(np.isfinite(data_losses), data_losses, np.nan), lw=0.6, alpha=0.5,
                    label="data loss")
        if len(losses) >= 20:
            window = max(5, len(losses) // 50)
            smooth = np.convolve(shown, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window} batches")
        if history.get("stopped"):  # the batch whose loss stopped the run
            last = losses[-1]
            y = last if np.isfinite(last) else np.nanmax(shown)
            ax.plot([len(losses)], [y], marker="x", ms=10, color="red", ls="none",
                    label=f"diverged: {last:.4g}" if np.isfinite(last) else f"diverged: the loss became {last}")
        if np.nanmin(shown) > 0:
            _log_scale(ax)
        ax.legend()
    elif len(losses):
        ax.text(0.5, 0.5, f"the loss was {losses[-1]} from the first batch on", ha="center", va="center",
                transform=ax.transAxes)
    else:
        _empty(ax, "batch")
    ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
    _note_stop(ax, history)
    paths.append(save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch")
    train = history.get("train_accuracy", [])
    if train:
        ax.set_ylim(*zoom([*train, *history.get("val_accuracy", []),
                           *([history["test"]["accuracy"]] if history.get("test") else [])]))
        epochs = np.arange(1, len(train) + 1)
        ax.plot(epochs, train, marker="o", label="train")
        val = history.get("val_accuracy", [])
        if val:
            ax.plot(epochs[:len(val)], val, marker="o", label="validation")
        best = history.get("best_epoch")
        if best and val:
            ax.axvline(best, color="grey", ls=":", label=f"best epoch ({best})")
        test = history.get("test")
        if test:
            ax.plot([test["epoch"]], [test["accuracy"]], marker="*", ms=14, ls="none", color="black",
                    label=f"test, once: {test['accuracy']:.3f}")
        ax.legend(loc="lower right")
        ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
    else:
        _empty(ax, "epoch")
    ax.grid(alpha=0.3)
    _note_stop(ax, history)
    paths.append(save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.set(xlabel="batch", ylabel="learning rate", title="Learning rate per batch")
    rates = np.asarray(history.get("batch_lr", []), dtype=float)
    if len(rates):
        ax.plot(np.arange(1, len(rates) + 1), rates, lw=1.2)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
    else:
        _empty(ax, "batch")
    ax.grid(alpha=0.3)
    paths.append(save(fig, out_dir / "lr.png"))
    if history.get("diagnostics"):
        paths.append(plot_layers(history, out_dir / "layers.png"))
    return paths


def plot_layers(history: dict, path) -> Path:
    """Four panels of the per-layer diagnostics (``pycnn.training.diagnostics``): each layer keeps its
    colour in every panel, and one legend on the right names them."""

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    panels = [("std", "activation std", "log"), ("dead", "dead units (share of a layer's units)", "linear"),
              ("grad_norm.weight", "gradient norm (weights)", "log"),
              ("update_ratio.weight", "update / weight ratio", "log")]
    names: list = []
    for reading in history.get("diagnostics") or []:
        names += [name for name in reading["layers"] if name not in names]
    names.sort(key=lambda name: int(name.split(":")[0]) if name.split(":")[0].isdigit() else 0)
    cycle = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {name: cycle(i % cycle.N) for i, name in enumerate(names)}
    handles = {}
    for ax, (quantity, label, scale) in zip(axes.flat, panels):
        lines = series(history, quantity)
        for name, (steps, values) in lines.items():
            handles[name], = ax.plot(steps, values, marker=".", lw=1, color=colours[name], label=name)
        if quantity == "update_ratio.weight":
            ax.axhline(1e-3, color="grey", ls=":")
            ax.annotate("1e-3: healthy", (0.01, 1e-3), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", color="grey", fontsize=8, va="bottom")
        ax.set_title(label)
        if lines and scale == "log" and min(min(v) for _, v in lines.values()) > 0:
            _log_scale(ax)
        if quantity == "dead":
            ax.set_ylim(-0.02, 1.02)
        if not lines:
            ax.text(0.5, 0.5, "no layer of this kind", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    if handles:
        fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
                   loc="center right", fontsize=8, title="layer", frameon=False)
    return save(fig, Path(path), dpi=90, rect=(0, 0, 0.86 if handles else 1, 1))


def plot_confusion(matrix: np.ndarray, names: list, path, title: str) -> Path:
    """A confusion matrix normalised per true class (rows), with the counts written in; ``path``
    is written (its folder must exist)."""
    plt = _pyplot()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=60, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the true class")
    save(fig, path, dpi=110)
    return Path(path)
