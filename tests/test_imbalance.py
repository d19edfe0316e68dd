"""pycnn imbalance: long-tailed subsets, class weights, per-class scores, balanced sampling and
the two-stage fine-tune, on tiny digits runs in this process."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from pycnn import data
from pycnn.training import cli  # noqa: E402
from pycnn.training.config import Config  # noqa: E402
from pycnn.training.tools import imbalance, trial  # noqa: E402
from pycnn.training.tools.imbalance import ImbalanceError, Options  # noqa: E402

TINY = ["--dataset", "digits", "--widths", "4", "--batch-size", "32", "--prefetch", "0", "--val-size", "100"]
TINY_CONFIG = dict(dataset="digits", widths=(4,), batch_size=32, prefetch=0, val_size=100, epochs=2)
quiet = lambda *a, **k: None  # noqa: E731


def test_long_tailed_counts_and_subsets():
    assert imbalance.long_tailed_counts(1000, 10, 10) == [1000, 774, 599, 464, 359, 278, 215, 167, 129, 100]
    assert imbalance.long_tailed_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    assert imbalance.long_tailed_counts(50, 3, 1) == [50, 50, 50]
    labels = np.repeat(np.arange(3), [60, 70, 80])
    keep = imbalance.long_tailed(labels, ratio=4, per_class=40, seed=1)
    assert np.bincount(labels[keep]).tolist() == [40, 20, 10]
    assert np.array_equal(keep, np.sort(keep)) and len(set(keep)) == len(keep)
    assert np.array_equal(keep, imbalance.long_tailed(labels, ratio=4, per_class=40, seed=1))   # seeded
    assert not np.array_equal(keep, imbalance.long_tailed(labels, ratio=4, per_class=40, seed=2))
    assert np.bincount(labels[imbalance.long_tailed(labels, ratio=2)]).tolist() == [60, 42, 30]  # n_max: smallest class
    for bad, named in ((dict(ratio=0.5), "--ratio"), (dict(ratio=2, per_class=61), "--per-class"),
                       (dict(ratio=2, profile="linear"), "--profile")):
        with pytest.raises(ImbalanceError, match=named):
            imbalance.long_tailed(labels, **bad)


def test_class_weights_even_out_the_classes():
    counts = np.array([100, 25, 4])
    w = imbalance.class_weights(counts, "inverse")
    assert (w * counts).sum() == pytest.approx(counts.sum())              # mean weight per image is 1
    assert w * counts == pytest.approx(np.full(3, counts.sum() / 3))      # each class weighs the same
    sqrt = imbalance.class_weights(counts, "sqrt")
    assert sqrt[2] / sqrt[0] == pytest.approx(5.0, rel=1e-6)
    eff = imbalance.class_weights(counts, "effective")
    assert eff[0] < eff[1] < eff[2] < w[2] / w[0] * eff[0]                 # between flat and inverse
    assert imbalance.class_weights([5, 0], "inverse").tolist() == [1.0, 0.0]
    with pytest.raises(ImbalanceError, match="--class-weight"):
        imbalance.class_weights(counts, "log")


def test_confusion_matrix_and_per_class_accuracy():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0, 0])
    m = imbalance.confusion_matrix(predicted, labels, 3)
    assert m.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    assert imbalance.per_class_accuracy(m).tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert imbalance.head_classes([100, 77, 60, 46, 35, 28]) == [0, 1, 2]
    assert imbalance.head_classes([100, 77, 60, 46, 35, 28], head=2) == [0, 1]


def test_balanced_sampling_of_a_long_tailed_set():
    splits = imbalance.make_splits(Config(**TINY_CONFIG), Options(ratio=10, per_class=50))
    counts = np.bincount(splits.train_y, minlength=10)
    assert counts[0] == 50 and counts[-1] == 5 and np.all(np.diff(counts) <= 0)
    assert np.bincount(splits.val_y, minlength=10).min() >= 9                  # validation stays balanced
    epoch = data.BalancedSampler(splits.train_y, "upsample", seed=0).epoch_indices(0)
    assert np.bincount(splits.train_y[epoch], minlength=10).tolist() == [50] * 10


def test_remedies_and_two_stage_fine_tune(tmp_path, capsys):
    argv = ["imbalance", "--backend", "local", "--ratio", "10", "--per-class", "60", "--epochs", "2",
            "--remedies", "plain,upsample,weights,two-stage", "--stage2-epochs", "1", "--run-dir", str(tmp_path), *TINY]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "imbalance.json").read_text())
    assert report["dataset"]["train_images_per_class"] == [60, 46, 36, 28, 22, 17, 13, 10, 8, 6]
    by = {r["remedy"]: r for r in report["remedies"]}
    assert list(by) == ["plain", "upsample", "weights", "two-stage"]
    for r in by.values():
        assert r["status"] == "finished" and len(r["per_class_accuracy"]) == 10
        assert r["mean_per_class_accuracy"] == pytest.approx(np.mean(r["per_class_accuracy"]))
        assert np.array(r["confusion"]).sum() == 359
        assert (tmp_path / f"confusion_{r['remedy']}.png").stat().st_size
    assert by["upsample"]["images_processed"] == 2 * 600                      # 10 classes x 60, two epochs
    w = by["weights"]["class_weight"]
    assert w[-1] / w[0] == pytest.approx(10, rel=0.01) and "gain_over_plain" in by["weights"]
    two = by["two-stage"]
    assert two["head_classes"] == [0, 1, 2, 3, 4] and two["tail_classes"] == [5, 6, 7, 8, 9]
    assert two["replay_per_head_class"] == 11                                  # mean tail count
    assert two["stage1"]["images"] == 60 + 46 + 36 + 28 + 22 and two["stage2"]["images"] == 54 + 5 * 11
    # stage 2 at the full rate (the default factor), for the epochs asked
    stage2 = json.loads((tmp_path / "two-stage" / "stage2" / "config.json").read_text())
    assert stage2["lr"] == pytest.approx(Config().lr) and stage2["epochs"] == 1 and stage2["warmup_steps"] == 0
    assert two["checkpoint"].startswith(str(tmp_path / "two-stage" / "stage2"))
    assert (tmp_path / "per_class.png").stat().st_size
    out = capsys.readouterr().out
    assert "mean per-class acc" in out and "two-stage" in out
    for r in by.values():  # each remedy timed, wall clock (it was 0 in every row)
        assert r["seconds"] > 0 and r["seconds"] >= r["train_seconds"] > 0
        assert f"| {r['images_processed']} | {r['seconds']:.1f} |" in out


def test_a_rerun_with_other_settings_is_refused_not_scored_with_the_old_remedies(tmp_path, capsys):
    argv = ["imbalance", "--backend", "local", "--ratio", "10", "--per-class", "20", "--remedies", "plain",
            "--run-dir", str(tmp_path), *TINY]
    assert cli.main([*argv, "--epochs", "1"]) == 0
    first = json.loads((tmp_path / "imbalance.json").read_text())["remedies"][0]
    assert cli.main([*argv, "--epochs", "1"]) == 0  # the same command: the remedy is reused, its time kept
    again = json.loads((tmp_path / "imbalance.json").read_text())["remedies"][0]
    assert again["reused"] and again["images_processed"] == first["images_processed"]
    assert again["seconds"] >= first["train_seconds"]
    capsys.readouterr()
    assert cli.main([*argv, "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds remedies trained with other settings (epochs 3 (the folder's: 1))" in err


def test_downsample_is_a_default_remedy_and_an_unconverged_stage_is_said():
    parser = cli.build_parser()
    args = parser.parse_args(["imbalance"])
    assert args.remedies == ["plain", "upsample", "downsample", "weights", "two-stage"]
    rising = trial.Outcome("finished", "", 3, 3, 0.757, 0.9, 1.0, 100, [
        {"val_accuracy": 0.215}, {"val_accuracy": 0.75}, {"val_accuracy": 0.757}])
    warning = imbalance.not_converged(rising, "stage 2", "--stage2-epochs")
    assert warning.startswith("stage 2 had not converged") and "0.215 -> 0.750 -> 0.757" in warning
    assert "--stage2-epochs" in warning
    flat = trial.Outcome("finished", "", 3, 2, 0.75, 0.9, 1.0, 100, [
        {"val_accuracy": 0.5}, {"val_accuracy": 0.75}, {"val_accuracy": 0.74}])
    assert imbalance.not_converged(flat) is None
    row = {"remedy": "two-stage", "status": "finished", "reason": "", "val_accuracy": 0.5,
           "mean_per_class_accuracy": 0.5, "per_class_accuracy": [0.5, 0.5], "images_processed": 10, "seconds": 0.25,
           "warnings": [warning]}
    text = imbalance.table([row], [10, 5])
    assert "| 10 | 0.2 |" in text or "| 10 | 0.3 |" in text
    assert "note: two-stage: stage 2 had not converged" in text


def test_stage_two_starts_from_stage_one_on_the_small_classes_alone(tmp_path, monkeypatch):
    config = Config(**TINY_CONFIG)
    splits = imbalance.make_splits(config, Options(ratio=5, per_class=40))
    counts = np.bincount(splits.train_y, minlength=10)
    calls, train = [], trial.train_config

    def spy(config, folder, **kwargs):
        calls.append((config, kwargs))
        return train(config, folder, **kwargs)

    monkeypatch.setattr(trial, "train_config", spy)
    outcome, facts = imbalance.two_stage(config, splits, counts, Options(ratio=5, per_class=40, replay=0, head=3,
                                                                         stage2_lr_factor=0.1), tmp_path)
    assert outcome.status == "finished" and facts["head_classes"] == [0, 1, 2]
    (first_config, first), (second_config, second) = calls
    assert set(first["splits"].train_y.tolist()) == {0, 1, 2} and set(first["splits"].val_y.tolist()) == {0, 1, 2}
    assert set(second["splits"].train_y.tolist()) == set(range(3, 10))          # replay 0: the small classes
    assert len(second["splits"].val_y) == len(splits.val_y)                      # validated on every class
    assert facts["stage2"]["images"] == counts[3:].sum() and second_config.lr == pytest.approx(0.1 * config.lr)
    best = trial.load_predictor(tmp_path / "stage1" / trial.read_outcome(tmp_path / "stage1").best_checkpoint)
    for name, value in best.model.state_dict().items():                          # stage 1's best weights
        assert np.array_equal(second["init_state"][name], value), name
    assert all(np.array_equal(a, b) for a, b in zip(second["preprocessor"].state_dict().values(),
                                                      best.preprocessor.state_dict().values()))


def test_bad_input_is_one_line_with_status_2(tmp_path, capsys):
    def fails(*argv):
        status = cli.main(["imbalance", "--backend", "local", "--run-dir", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "--ratio" in fails("--ratio", "0.5")
    assert "--remedies" in fails("--remedies", "plain,oversample", *TINY)
    assert "--per-class" in fails("--per-class", "100000", *TINY)
    assert "--stage2-lr-factor" in fails("--stage2-lr-factor", "2")
    assert "--head" in fails("--head", "10", "--remedies", "two-stage", "--epochs", "1", *TINY)
