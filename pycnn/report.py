"""``report.html``: one self-contained page per run (figures embedded as PNG data, no
external files) with the readings of the figures in words, following CS231n lecture 6 and
the tips: the start against ln(C), the learning rate from the loss curve's shape,
overfitting from the train / validation gap, the best epoch, the per-layer update ratios,
dead units and activation scales, and the test accuracy, measured once, on its own."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np


def readings(history: dict, classes: int | None = None, loss: str = "cross_entropy") -> list[str]:
    """What the run's numbers say, one sentence (or two) per reading."""
    out = []
    losses = np.asarray(history.get("batch_loss") or [], dtype=float)
    data = np.asarray(history.get("batch_data_loss") or [], dtype=float)
    if classes and len(data):
        expected = classes - 1 if loss == "hinge" else math.log(classes)
        off = data[0] / expected - 1
        verdict = "as it should" if abs(off) <= 0.1 else "too high: the first scores are too large" if off > 0 else \
            "below chance: look for leaking labels"
        out.append(f"Start: the first batch's data loss was {data[0]:.3f} against {expected:.3f} for a uniform guess "
                   f"({off:+.0%}), {verdict}.")
    if history.get("stopped"):
        out.append(f"The run diverged ({history['stopped']}). Lower the learning rate, by 3 to 10 times.")
    if history.get("interrupted"):
        out.append(f"The run was interrupted; it resumes from {history['interrupted']} with --resume.")
    if len(losses) >= 20 and np.isfinite(losses).all():
        tenth = max(2, len(losses) // 10)
        first, last = losses[:tenth].mean(), losses[-tenth:].mean()
        middle = losses[len(losses) // 2 - tenth // 2: len(losses) // 2 + tenth // 2 + 1].mean()
        if last > 0.9 * first:
            out.append(f"Learning rate: the loss hardly fell ({first:.3f} to {last:.3f}); the rate is too low (or so "
                       "high that the loss bounces): try 3x and 1/3x.")
        elif (middle - last) > 0.5 * (first - middle):
            out.append(f"Learning rate: the loss ({first:.3f} to {last:.3f}) was still falling steadily in the second "
                       "half, nearly linearly: more epochs or a higher rate would help.")
        else:
            out.append(f"Learning rate: the loss fell fast and levelled off ({first:.3f} to {last:.3f}), the shape of "
                       "a good rate.")
        window = max(5, len(losses) // 50)
        tail = losses[-5 * window:]
        smooth = np.convolve(tail, np.ones(window) / window, mode="valid")
        spread = float(np.std(tail[window - 1:] - smooth) / max(np.mean(smooth), 1e-12))
        if spread > 0.5:
            out.append(f"The batch losses scatter widely around their mean ({spread:.0%} of it): larger batches "
                       "would smooth the estimate of the gradient.")
    train, val = history.get("train_accuracy") or [], history.get("val_accuracy") or []
    best = history.get("best_epoch")
    if val and best:
        gap = train[best - 1] - val[best - 1]
        if gap > 0.05:
            out.append(f"Overfitting: at the best epoch the training accuracy ({train[best - 1]:.3f}) is {gap:.3f} above "
                       f"the validation accuracy ({val[best - 1]:.3f}); more regularisation (dropout, weight decay, "
                       "augmentation) or more data would close the gap.")
        elif val[best - 1] < 0.6:
            out.append(f"Underfitting: training ({train[best - 1]:.3f}) and validation ({val[best - 1]:.3f}) accuracy "
                       "are both low; a larger model, a better rate or longer training would help.")
        else:
            out.append(f"Training ({train[best - 1]:.3f}) and validation ({val[best - 1]:.3f}) accuracy agree within "
                       f"{abs(gap):.3f}: no sign of overfitting.")
        if best == len(val) and len(val) > 1 and val[-1] > val[-2]:
            out.append(f"The validation accuracy was still rising at the last epoch ({len(val)}): train longer.")
        elif best < len(val):
            out.append(f"The validation accuracy peaked at epoch {best} of {len(val)}; those weights were kept, and "
                       "--early-stop would have saved the epochs after it.")
    out += _layer_readings(history)
    test = history.get("test")
    if test:
        out.append(f"Test: {test['accuracy']:.4f} on {test['images']} images, measured once at the end with the "
                   f"weights of epoch {test['epoch']} ({test['chosen_by']}); nothing was tuned on it.")
    return out


def _layer_readings(history: dict) -> list[str]:
    from pycnn.diagnostics import series

    out = []
    ratios = {name: np.median(values[len(values) // 2:]) for name, (_, values) in
              series(history, "update_ratio.weight").items()}
    if ratios:
        high = [n for n, r in ratios.items() if r > 1e-2]
        low = [n for n, r in ratios.items() if r < 1e-4]
        text = ", ".join(f"{n} {r:.1e}" for n, r in ratios.items())
        verdict = ("too high in " + ", ".join(high) + ": lower the rate" if high else
                   "too low in " + ", ".join(low) + ": raise the rate" if low else "healthy (near 1e-3)")
        out.append(f"Update / weight ratios over the second half of training: {text}; {verdict}.")
    dead = {name: values[-1] for name, (_, values) in series(history, "dead").items()}
    if dead:
        worst = max(dead, key=dead.get)
        if dead[worst] > 0.5:
            out.append(f"{dead[worst]:.0%} of the units of {worst} are dead (zero for every image of a batch): a lower "
                       "rate, Leaky ReLU or PReLU would keep them alive.")
        else:
            out.append(f"Dead units: at most {dead[worst]:.0%} (in {worst}).")
    scales = {name: values[-1] for name, (_, values) in series(history, "std").items()
              if name.split(":")[1] in ("Conv3x3", "Linear")}
    if len(scales) >= 2:
        names = list(scales)
        ratio = scales[names[-2]] / max(scales[names[0]], 1e-12)
        if ratio < 1e-2 or ratio > 1e2:
            out.append(f"Activation scale changes {ratio:.1e}x from {names[0]} to {names[-2]}: signals "
                       f"{'vanish' if ratio < 1 else 'explode'} through the layers; check the initialisation.")
    return out


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"><figcaption>{path.name}</figcaption></figure>'


def write_report(history: dict, config: dict, run_dir, classes: int | None = None) -> Path:
    """RUN_DIR/report.html from the history, the config and the figures already in RUN_DIR."""
    run_dir = Path(run_dir)
    items = "".join(f"<li>{html.escape(text)}</li>" for text in readings(history, classes, config.get("loss",
                                                                                                       "cross_entropy")))
    figures = "".join(_image(run_dir / name) for name in ("loss.png", "accuracy.png", "lr.png", "layers.png")
                      if (run_dir / name).is_file())
    columns = ["train_loss", "train_data_loss", "train_reg_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    rows = "".join("<tr><td>{}</td>{}</tr>".format(e + 1, "".join(
        f"<td>{history[c][e]:.4g}</td>" if e < len(history.get(c) or []) else "<td></td>" for c in columns))
        for e in range(len(history.get("train_loss") or [])))
    settings = ", ".join(f"{k} = {html.escape(str(v))}" for k, v in config.items())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>pycnn run {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} td,th{{padding:0 .6em;text-align:right}}
img{{max-width:100%}} figure{{margin:1em 0}}</style></head><body>
<h1>pycnn run: {html.escape(str(run_dir))}</h1>
<h2>Readings</h2><ul>{items}</ul>
<h2>Figures</h2>{figures}
<h2>Epochs</h2><table><tr><th>epoch</th>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{rows}</table>
<h2>Settings</h2><p>{settings}</p>
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page)
    return path
