"""Diagnostic figures of a training run (CS231n lecture 6): the loss per batch (its shape
tells a learning rate too high, too low or right) and train / validation accuracy per
epoch (their gap tells overfitting)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_history(history: dict, out_dir) -> list[Path]:
    """Write loss.png and accuracy.png into ``out_dir``; returns their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    losses = np.asarray(history["batch_loss"], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="batch loss")
    if len(losses) >= 20:
        window = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window} batches")
    ax.set(xlabel="batch", ylabel="loss", title="Training loss per batch")
    if len(losses) and losses.min() > 0:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, len(history["train_accuracy"]) + 1)
    ax.plot(epochs, history["train_accuracy"], marker="o", label="train")
    if history.get("val_accuracy"):
        ax.plot(epochs[:len(history["val_accuracy"])], history["val_accuracy"], marker="o", label="validation")
    ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
