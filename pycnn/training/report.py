"""``report.html``: one self-contained page per run (figures embedded as PNG data, no
external files) with the readings of the figures in words, following CS231n lecture 6
("babysitting the learning process") and the tips' "insights from figures".

``diagnose(history, classes)`` gives the readings as ``Reading(topic, verdict, text)``;
every number they use comes from the history, and the lines they draw come from the sources:

* start: the first batch's data loss against ln(C) (C - 1 for the hinge loss), within 10%;
* learning rate, from the shape of the per-batch loss curve:
  - too high: the run diverged (NaN, or past 3x its first loss: the CS231n abort rule); or the
    smoothed loss climbed to ``JUMP`` = 1.5x its first value (half way to that abort line; at
    initialisation every batch scores about ln C, so such a climb is no batch noise) — the
    "strange" curve of a rate far too high; or the loss stalled (below) while the updates
    were larger than the healthy 1e-3 of the weights;
  - too low: the loss stalled with updates smaller than 1e-3 of the weights (or, without the
    per-layer readings, stalled without ever climbing); or it fell nearly linearly, the second
    half of the run taking off at least ``LINEAR`` = half as much as the first;
  - stalled: the mean of the last tenth of the batches is within ``STALL`` = 10% of the first
    batch's loss ("the loss barely changes");
  - good: a fast fall that levels off;
* batch size: the "width" of the curve, the batches' scatter around a running mean, above
  half of that mean (left out once the loss is near zero, where any scatter is large);
* fit, when the validation accuracy has converged (the mean of the last fifth of the epochs):
  overfitting when training accuracy is above validation accuracy by more than 0.05 and by
  more than twice the standard error of the validation accuracy (sqrt(p (1 - p) / n) for n
  validation images: a smaller gap is within its noise); underfitting when there is no such
  gap and the validation accuracy is in the lower half between chance (1/C) and 1;
* epochs: still rising at the end (train longer) or peaked earlier (early stopping);
* per layer (``pycnn.training.diagnostics``): update / weight ratios against 1e-3 (a factor 10 either
  way is flagged), dead rectifier units (more than half), activation scales that change by
  more than 100x through the network;
* the test accuracy, measured once at the end, reported on its own.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import math
from pathlib import Path

import numpy as np

from pycnn.training.diagnostics import series

HEALTHY_UPDATE = 1e-3     # CS231n: updates about 1e-3 of the weights
JUMP = 1.5                # the smoothed loss climbing to this many times its first value
STALL = 0.9               # the last tenth of the batches above this share of the first loss
LINEAR = 0.5              # second-half fall / first-half fall of a nearly linear curve
GAP = 0.05                # least train - validation accuracy gap called overfitting

TOPICS = {"start": "Start", "learning_rate": "Learning rate", "batch_size": "Batch size", "fit": "Fit",
          "epochs": "Epochs", "updates": "Updates", "dead_units": "Dead units", "scale": "Activations",
          "test": "Test", "run": "Run"}


@dataclasses.dataclass(frozen=True)
class Reading:
    """One reading of the run: ``topic`` (a key of TOPICS), ``verdict`` ('ok', 'info', or the
    problem: 'too_high', 'too_low', 'overfitting', 'underfitting', ...) and the text."""
    topic: str
    verdict: str
    text: str

    @property
    def flagged(self) -> bool:
        return self.verdict not in ("ok", "info")

    @property
    def label(self) -> str:
        verdict = "" if self.verdict in ("ok", "info") else ": " + self.verdict.replace("_", " ")
        return TOPICS.get(self.topic, self.topic) + verdict


def readings(history: dict, classes: int | None = None, loss: str = "cross_entropy") -> list[str]:
    """What the run's numbers say, one sentence (or two) per reading."""
    return [r.text for r in diagnose(history, classes, loss)]


def diagnose(history: dict, classes: int | None = None, loss: str = "cross_entropy") -> list[Reading]:
    """The readings of a run's history (see the module docstring for the rules)."""
    out = []
    losses = np.asarray(history.get("batch_loss") or [], dtype=float)
    data = np.asarray(history.get("batch_data_loss") or [], dtype=float)
    expected = (classes - 1 if loss == "hinge" else math.log(classes)) if classes else None
    if classes and len(data):
        off = data[0] / expected - 1
        verdict, words = (("ok", "as it should") if abs(off) <= 0.1 else
                          ("too_high", "too high: the first scores are too large") if off > 0 else
                          ("too_low", "below chance: look for leaking labels"))
        out.append(Reading("start", verdict, f"The first batch's data loss was {data[0]:.3f} against {expected:.3f} "
                                             f"for a uniform guess ({off:+.1%}), {words}."))
    if history.get("interrupted"):
        out.append(Reading("run", "info", f"The run was interrupted; it resumes from {history['interrupted']} "
                                          "with --resume."))
    ratios = _update_ratios(history)
    rate = _learning_rate(losses, history.get("stopped"), ratios, expected)
    if rate is not None:
        out.append(rate)
    scatter = _scatter(losses)
    if scatter is not None:
        out.append(scatter)
    out += _fit(history, classes)
    out += _layer_readings(history, ratios)
    test = history.get("test")
    if test:
        out.append(Reading("test", "info", f"Test accuracy {test['accuracy']:.4f} on {test['images']} images, "
                                           f"measured once at the end with the weights of epoch {test['epoch']} "
                                           f"({test['chosen_by']}); nothing was tuned on it."))
    return out


def _smooth(losses: np.ndarray) -> tuple[np.ndarray, int]:
    window = max(3, len(losses) // 50)
    return np.convolve(losses, np.ones(window) / window, mode="valid"), window


def _learning_rate(losses: np.ndarray, stopped, ratios: dict, expected: float | None = None) -> Reading | None:
    if stopped:
        reason = str(stopped).removesuffix(": lower the learning rate")
        return Reading("learning_rate", "too_high", f"Far too high: the run diverged ({reason}). Lower the rate 3 to "
                                                    "10 times.")
    if len(losses) < 20 or not np.isfinite(losses).all():
        return None
    n, start = len(losses), losses[0]
    trained = expected is not None and start < 0.5 * expected  # fine-tuning: the weights start trained
    tenth = max(2, n // 10)
    first, last = losses[:tenth].mean(), losses[-tenth:].mean()
    middle = losses[n // 2 - tenth // 2: n // 2 + tenth // 2 + 1].mean()
    smooth, window = _smooth(losses)
    early = smooth[: max(1, len(smooth) // 2)]
    peak, peak_at = float(early.max()), int(early.argmax()) + window
    update = float(np.median(list(ratios.values()))) if ratios else None
    said_update = f"; the updates are {update:.1e} of the weights (healthy: about 1e-3)" if update is not None else ""
    if peak >= JUMP * start:
        fate = (f"then stalled near {last:.3f}" if last > STALL * start else
                f"before falling to {last:.3f}: it recovered, but a lower rate or a warm-up would start smoother")
        return Reading("learning_rate", "too_high",
                       f"Too high: the loss climbed from {start:.3f} to {peak:.3f} ({peak / start:.1f}x) around batch "
                       f"{peak_at}, {fate}{said_update}.")
    if last > STALL * start and trained:
        return Reading("learning_rate", "info", f"The loss stayed near {last:.3f}; it started at {start:.3f}, well "
                                                f"below chance ({expected:.3f}), from trained weights{said_update}.")
    if last > STALL * start:
        if update is not None and update > HEALTHY_UPDATE:
            return Reading("learning_rate", "too_high", f"Too high: the loss stalled ({start:.3f} at the first batch, "
                                                        f"{last:.3f} at the end) although the weights moved a lot"
                                                        f"{said_update}: the steps overshoot. Lower the rate 3 to 10x.")
        return Reading("learning_rate", "too_low", f"Too low: the loss barely moved ({start:.3f} at the first batch, "
                                                   f"{last:.3f} at the end){said_update}. Raise the rate 3 to 10x.")
    if (middle - last) > LINEAR * (first - middle):
        return Reading("learning_rate", "too_low", f"Too low, or too few epochs: the loss ({first:.3f} to {last:.3f}) "
                                                   "was still falling steadily in the second half, nearly linearly; "
                                                   "a higher rate or more epochs would help.")
    return Reading("learning_rate", "ok", f"Good: the loss fell fast and levelled off ({first:.3f} to {last:.3f}), "
                                          "the shape of a good rate.")


def _scatter(losses: np.ndarray) -> Reading | None:
    if len(losses) < 20 or not np.isfinite(losses).all():
        return None
    window = max(5, len(losses) // 50)
    tail = losses[-5 * window:]
    local = np.convolve(tail, np.ones(window) / window, mode="valid")
    level = float(local.mean())
    if level < 0.05 * losses[0]:
        return None  # the training loss is near zero: its relative scatter says nothing
    spread = float(np.std(tail[window - 1:] - local) / level)
    if spread > 0.5:
        return Reading("batch_size", "too_small", f"The batch losses scatter widely around their running mean "
                                                  f"({spread:.0%} of it): larger batches would smooth the gradient.")
    return None


def _fit(history: dict, classes: int | None) -> list[Reading]:
    train, val = history.get("train_accuracy") or [], history.get("val_accuracy") or []
    best = history.get("best_epoch")
    if not val or not best or len(train) < len(val):
        return []
    out = []
    k = max(1, len(val) // 5)
    tr, va = float(np.mean(train[len(val) - k:len(val)])), float(np.mean(val[-k:]))
    where = f"over the last {k} epochs" if k > 1 else "at the last epoch"
    n = history.get("val_images")
    noise = 2 * math.sqrt(va * (1 - va) / n) if n else 0.0
    floor = max(GAP, noise)
    gap = tr - va
    chance = 1 / classes if classes else 0.1
    if gap > floor:
        out.append(Reading("fit", "overfitting", f"Overfitting: {where} the training accuracy ({tr:.3f}) is {gap:.3f} "
                                                 f"above the validation accuracy ({va:.3f}"
                                                 + (f", standard error {noise / 2:.3f} on {n} images" if n else "")
                                                 + "); more regularisation (dropout, weight "
                                                 "decay, augmentation) or more data would close the gap."))
    elif va < (1 + chance) / 2:
        out.append(Reading("fit", "underfitting", f"Underfitting: {where} training ({tr:.3f}) and validation "
                                                  f"({va:.3f}) accuracy are both low, in the lower half between "
                                                  f"chance ({chance:.2f}) and 1; a larger model, a better rate or "
                                                  "longer training would help."))
    elif gap > 0:
        out.append(Reading("fit", "ok", f"No overfitting: {where} training ({tr:.3f}) and validation ({va:.3f}) "
                                        f"accuracy agree within {gap:.3f}."))
    else:
        out.append(Reading("fit", "ok", f"No overfitting: {where} the validation accuracy ({va:.3f}) is not below the "
                                        f"training accuracy ({tr:.3f}, measured with dropout and augmentation on "
                                        "while the weights still moved)."))
    if best == len(val) and len(val) > 1 and val[-1] > val[-2]:
        out.append(Reading("epochs", "too_few", f"The validation accuracy was still rising at the last epoch "
                                                f"({len(val)}): train longer."))
    elif best < len(val):
        out.append(Reading("epochs", "info", f"The validation accuracy peaked at epoch {best} of {len(val)} "
                                             f"({val[best - 1]:.4f}); those weights were kept, and --early-stop would "
                                             "have saved the epochs after it."))
    return out


def _update_ratios(history: dict) -> dict:
    """{layer: median update / weight ratio over the later half of the diagnostic steps}."""

    return {name: float(np.median(values[len(values) // 2:])) for name, (_, values) in
            series(history, "update_ratio.weight").items()}


def _layer_readings(history: dict, ratios: dict) -> list[Reading]:

    out = []
    if ratios:
        steps = [r["step"] for r in history.get("diagnostics") or []]
        later = steps[len(steps) // 2:]
        span = f"step {later[0]}" if len(later) == 1 else f"steps {later[0]}-{later[-1]}"
        high = [n for n, r in ratios.items() if r > 10 * HEALTHY_UPDATE]
        low = [n for n, r in ratios.items() if r < HEALTHY_UPDATE / 10]
        text = ", ".join(f"{n} {r:.1e}" for n, r in ratios.items())
        verdict, words = (("too_high", "more than 10x the healthy 1e-3 in " + ", ".join(high) + ": lower the rate")
                          if high else
                          ("too_low", "less than 1/10 of the healthy 1e-3 in " + ", ".join(low) + ": raise the rate")
                          if low else ("ok", "healthy (within 10x of 1e-3)"))
        out.append(Reading("updates", verdict, f"Update / weight ratios (median over {span}): {text}; {words}."))
    dead = {name: values[-1] for name, (_, values) in series(history, "dead").items()}
    if dead:
        worst = max(dead, key=dead.get)
        if dead[worst] > 0.5:
            out.append(Reading("dead_units", "too_many",
                               f"{dead[worst]:.0%} of the units of {worst} are dead (zero for every image of a "
                               "batch): a lower rate, Leaky ReLU or PReLU would keep them alive."))
        else:
            out.append(Reading("dead_units", "ok", f"Dead units: at most {dead[worst]:.0%} (in {worst})."))
    scales = {name: values[-1] for name, (_, values) in series(history, "std").items()
              if name.split(":")[1] in ("Conv3x3", "Linear")}
    if len(scales) >= 2:
        names = list(scales)
        ratio = scales[names[-2]] / max(scales[names[0]], 1e-12)
        if ratio < 1e-2 or ratio > 1e2:
            out.append(Reading("scale", "vanishing" if ratio < 1 else "exploding",
                               f"Activation scale changes {ratio:.1e}x from {names[0]} to {names[-2]}: signals "
                               f"{'vanish' if ratio < 1 else 'explode'} through the layers; check the initialisation."))
    return out


# ------------------------------------------------------------------------------- page

def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}">'
            f'<figcaption>{path.name}</figcaption></figure>')


def _results(history: dict) -> str:
    rows = []
    val, best = history.get("val_accuracy") or [], history.get("best_epoch")
    if val and best:
        images = f" on {history['val_images']} images" if history.get("val_images") else ""
        rows.append(f"<tr><th>validation accuracy</th><td>{val[best - 1]:.4f}</td><td>best epoch {best} of "
                    f"{len(val)}{images}; it chose the epoch</td></tr>")
    test = history.get("test")
    if test:
        rows.append(f"<tr><th>test accuracy</th><td>{test['accuracy']:.4f}</td><td>{test['images']} images, measured "
                    f"once with the weights of epoch {test['epoch']}</td></tr>")
    for key, label in (("stopped", "diverged"), ("early_stopped", "early stop"), ("interrupted", "interrupted")):
        if history.get(key):
            rows.append(f"<tr><th>{label}</th><td colspan=2>{html.escape(str(history[key]))}</td></tr>")
    return f"<table class=results>{''.join(rows)}</table>" if rows else "<p>No epoch finished.</p>"


_STYLE = """body{font-family:sans-serif;max-width:62em;margin:2em auto;padding:0 1em;line-height:1.4}
h1{font-size:1.5em;word-break:break-all} td,th{padding:.1em .6em} table.epochs td{text-align:right}
table.results th,table.settings th{text-align:left;font-weight:normal;color:#444}
table.results td:nth-child(2){font-weight:bold;text-align:right}
ul.readings{list-style:none;padding:0} ul.readings li{margin:.4em 0;padding:.3em .6em;border-left:.35em solid #4a4}
ul.readings li.flag{border-color:#c33;background:#fdf0f0} ul.readings li.advice{border-color:#d90;background:#fff8e6}
ul.readings li.info{border-color:#999} ul.readings li{display:grid;grid-template-columns:12em 1fr;gap:0 .5em}
img{max-width:100%} figure{margin:1em 0} figcaption{color:#666;font-size:.85em}
dl.settings{display:grid;grid-template-columns:repeat(3,auto 1fr);gap:.1em .8em;font-size:.85em}
dl.settings dt{color:#555} dl.settings dd{margin:0} .summary{font-size:1.05em}"""
ADVICE = {("epochs", "too_few")}  # a suggestion rather than a fault: coloured apart


def _css_class(reading: Reading) -> str:
    if (reading.topic, reading.verdict) in ADVICE:
        return "advice"
    return "flag" if reading.flagged else reading.verdict


def _describe(config: dict) -> str:
    """One line: the data and the model of the run, from its config."""
    if not config.get("dataset"):
        return ""
    widths = ",".join(str(w) for w in config.get("widths") or [])
    limit = f", {config['limit']} training images before the validation split" if config.get("limit") else ""
    return (f"{config['dataset']}{limit}; widths {widths}, {config.get('optimizer', 'sgd')} at lr {config.get('lr')} "
            f"({config.get('schedule')} schedule), batch {config.get('batch_size')}, {config.get('epochs')} epochs.")


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "(all)"
    return str(value)


def write_report(history: dict, config: dict, run_dir, classes: int | None = None) -> Path:
    """RUN_DIR/report.html from the history, the config and the figures already in RUN_DIR."""
    run_dir = Path(run_dir)
    found = diagnose(history, classes, config.get("loss", "cross_entropy"))
    items = "".join(f'<li class="{_css_class(r)}"><b>{html.escape(r.label)}</b> {html.escape(r.text)}</li>'
                    for r in found)
    flagged = [r.label for r in found if r.flagged and (r.topic, r.verdict) not in ADVICE]
    advice = [r.label for r in found if (r.topic, r.verdict) in ADVICE]
    summary = ("Flagged: " + "; ".join(html.escape(f) for f in flagged) + "." if flagged else "Nothing flagged.") + \
        (" Advice: " + "; ".join(html.escape(a) for a in advice) + "." if advice else "")
    figures = "".join(_image(run_dir / name) for name in ("loss.png", "accuracy.png", "lr.png", "layers.png")
                      if (run_dir / name).is_file())
    columns = ["train_loss", "train_data_loss", "train_reg_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    rows = "".join("<tr><td>{}</td>{}</tr>".format(e + 1, "".join(
        f"<td>{history[c][e]:.4g}</td>" if e < len(history.get(c) or []) else "<td></td>" for c in columns))
        for e in range(len(history.get("train_loss") or [])))
    settings = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(_setting(v))}</dd>" for k, v in config.items())
    title = f"{config.get('dataset', '')} run {run_dir}".strip()
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>pycnn: {html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>pycnn run: {html.escape(str(run_dir))}</h1>
<p>{html.escape(_describe(config))}</p>
<h2>Results</h2>{_results(history)}
<h2>Readings</h2><p class=summary>{summary}</p><ul class=readings>{items}</ul>
<h2>Figures</h2>{figures}
<h2>Epochs</h2><table class=epochs><tr><th>epoch</th>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{rows}</table>
<h2>Settings</h2><dl class=settings>{settings}</dl>
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page)
    return path
