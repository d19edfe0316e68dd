"""Per-layer diagnostics every k steps, the figures (learning rate, layers, an aborted run)
and the self-contained report.html with its readings in words."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

import pycnn  # noqa: E402
import pycnn.functional as F  # noqa: E402
from pycnn import nn, optim
from pycnn.autograd import Tensor  # noqa: E402
from pycnn.training import figures, report  # noqa: E402
from pycnn.training.config import Config
from pycnn.training.diagnostics import LayerDiagnostics, series  # noqa: E402
from pycnn.training.runs import run  # noqa: E402


def test_readings_match_a_hand_computation():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 4, rng=rng), nn.ReLU(), nn.Linear(4, 3, rng=rng))
    with pycnn.no_grad():
        model[0].bias.data[:] = [-100.0, 0.0, 0.0, 0.0]  # unit 0 is dead for every input
    opt = optim.SGD(model.parameters(), lr=0.1)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    diagnostics, history = LayerDiagnostics(every=2), {}
    assert diagnostics.due(0) and not diagnostics.due(1) and diagnostics.due(4)
    weight0, bias0 = model[0].weight.data.copy(), model[0].bias.data.copy()
    out = diagnostics.forward(model, Tensor(x), step=0)
    np.testing.assert_array_equal(out.data, model(Tensor(x)).data)
    loss = F.softmax_cross_entropy(out, np.arange(8) % 3)
    opt.zero_grad()
    loss.backward()
    weight, grad = model[2].weight.data.copy(), model[2].weight.grad.copy()
    diagnostics.before_step(model)
    opt.step()
    diagnostics.after_step(history)
    layers = history["diagnostics"][0]["layers"]
    assert layers["1:ReLU"]["dead"] == pytest.approx(0.25)  # 1 of the 4 hidden units
    assert layers["2:Linear"]["grad_norm.weight"] == pytest.approx(float(np.linalg.norm(grad)), rel=1e-5)
    assert layers["2:Linear"]["update_ratio.weight"] == pytest.approx(
        0.1 * np.linalg.norm(grad) / np.linalg.norm(weight), rel=1e-4)
    assert layers["0:Linear"]["std"] == pytest.approx(float((x @ weight0.T + bias0).std()), rel=1e-5)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        LayerDiagnostics(every=0)


def test_diagnostics_change_nothing_and_land_in_history_figures_and_report(tmp_path):
    plain = run(Config(epochs=1, limit=200, diagnostics_every=0), tmp_path / "plain", progress=False)
    history = run(Config(epochs=1, limit=200, diagnostics_every=2), tmp_path / "diag", progress=False)
    assert history["batch_loss"] == plain["batch_loss"] and plain["diagnostics"] == []
    steps = len(history["batch_loss"])
    assert [r["step"] for r in history["diagnostics"]] == list(range(0, steps, 2))
    assert set(series(history, "dead")) == {"2:ReLU", "6:ReLU"}
    assert (tmp_path / "diag" / "layers.png").stat().st_size > 10_000
    page = (tmp_path / "diag" / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert "Update / weight ratios" in page and f"Test accuracy {history['test']['accuracy']:.4f}" in page
    assert "<th>validation accuracy</th>" in page and "<th>test accuracy</th>" in page  # each on its own row
    assert f"against {math.log(10):.3f} for a uniform guess" in page


def test_readings_name_divergence_overfitting_and_dead_units():
    diverged = {"batch_loss": [2.3, 9.0], "batch_data_loss": [2.3, 9.0], "stopped": "the loss 9 exceeded 3x"}
    assert any("diverged" in r and "Lower the rate" in r for r in report.readings(diverged, 10))
    assert [r.verdict for r in report.diagnose(diverged, 10) if r.topic == "learning_rate"] == ["too_high"]
    overfit = {"train_accuracy": [0.8, 0.99, 1.0], "val_accuracy": [0.7, 0.8, 0.79], "best_epoch": 2,
               "diagnostics": [{"step": 0, "layers": {"2:ReLU": {"dead": 0.7}}}]}
    text = " ".join(report.readings(overfit))
    assert "Overfitting" in text and "peaked at epoch 2 of 3" in text and "70% of the units of 2:ReLU are dead" in text
    too_high = {"diagnostics": [{"step": s, "layers": {"0:Conv3x3": {"update_ratio.weight": 0.05}}} for s in range(4)]}
    found = [r for r in report.diagnose(too_high) if r.topic == "updates"]
    assert found[0].verdict == "too_high" and "healthy 1e-3 in 0:Conv3x3" in found[0].text


def test_a_run_without_a_finished_batch_still_gets_figures(tmp_path):
    paths = figures.plot_history({"batch_loss": [], "train_accuracy": [], "stopped": "the loss became nan"}, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "lr.png"]
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_gradient_check_tells_a_kink_from_a_wrong_backward():
    """The first 4 images of this CIFAR-10 config put a max-pool switch (or a ReLU at 0) between
    the two points of one central difference at step 1e-6: 7.6e-3 relative error, gone at 1e-7."""
    from pycnn.data import datasets, preprocess
    from pycnn.training import checks
    from pycnn.training.pipeline import model_spec, split_data

    if not (datasets.cifar10_dir() / "train.npz").is_file():
        pytest.skip("no CIFAR-10 copy")
    config = Config(dataset="cifar10", limit=10000, widths=(16, 32, 64))
    splits = split_data(config)
    x = preprocess.Standardise(per="channel").fit(splits.train_x)(splits.train_x[:4])
    result = checks.check_gradients(config, model_spec(config, 3, 32, 10), x, splits.train_y[:4])
    assert result.passed and "1 direction straddled a kink" in result.reading, result.reading
