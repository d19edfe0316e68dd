"""pycnn check: initial loss against ln(C), the regularisation term, overfitting a tiny subset
and a gradient check of the whole model; each check fails when it should, with a fix."""
from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

import pycnn  # noqa: E402
from pycnn import nn
from pycnn.training import checks, cli  # noqa: E402
from pycnn.training.config import Config
from pycnn.training.pipeline import model_spec, split_data  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return split_data(Config())


def test_default_config_passes_every_check_and_keeps_the_random_state(splits):
    pycnn.manual_seed(7)
    before = pycnn.random.generator().bit_generator.state
    report = checks.run_checks(Config(), splits)
    assert pycnn.random.generator().bit_generator.state == before
    assert [c.name for c in report.checks] == ["initial loss", "regularisation", "overfit 50 images", "gradient check"]
    assert report.passed, report.block()
    assert "expected ln 10 = 2.3026" in report.checks[0].reading
    assert "100% training accuracy after" in report.checks[2].reading


def test_initial_loss_fails_for_a_full_scale_head(splits):
    from pycnn import models
    from pycnn.data import preprocess
    config = Config()
    model = models.build({**model_spec(config, 1, 8, 10), "head_gain": 1.0})
    x = preprocess.Standardise(per="channel").fit(splits.train_x)(splits.train_x[:256])
    result = checks.check_initial_loss(config, model, x, splits.train_y[:256], 10)
    assert not result.passed and "the first scores are too large" in result.fix


def test_regularisation_and_overfit_failures_suggest_a_fix(splits, capsys):
    assert cli.main(["check", "--weight-decay", "1.0", "--steps", "30"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  regularisation" in out and "weight_decay 1 is too strong (try a tenth of it)" in out
    result = checks.check_overfit(Config(lr=50.0), model_spec(Config(), 1, 8, 10),
                                  _standardiser(splits), splits, images=30, steps=30)
    assert not result.passed and "too high" in result.fix


def _standardiser(splits):
    from pycnn.data import preprocess
    return preprocess.Standardise(per="channel").fit(splits.train_x)


class _WrongWeightGradient(pycnn.Function):
    """x @ w.T + b whose weight gradient is 10% too large."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, 1.1 * grad.T @ x, grad.sum(axis=0)


def test_gradient_check_finds_a_wrong_backward(splits, monkeypatch):
    config = Config(dropout=0.5)
    spec = model_spec(config, 1, 8, 10)
    x = _standardiser(splits)(splits.train_x[:4])
    good = checks.check_gradients(config, spec, x, splits.train_y[:4])
    assert good.passed and float(good.reading.split("error ")[1].split()[0]) < 1e-6
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: _WrongWeightGradient.apply(x, self.weight, self.bias))
    bad = checks.check_gradients(config, spec, x, splits.train_y[:4])
    assert not bad.passed and "worst in 10.weight" in bad.reading


def test_check_command_rejects_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--steps", "2.5"])
    assert exc.value.code == 2
    assert "argument --steps: expected an integer, got '2.5'" in capsys.readouterr().err
    assert cli.main(["check", "--crop-padding", "9"]) == 2
    assert "crop_padding must be less than half" in capsys.readouterr().err
