"""pycnn ensemble: calibration error, majority vote, test-time views, the cyclic schedule, and
ensembles of every member kind (seeds, a search's top trials, a run's checkpoints, cyclic
snapshots) with TTA, on tiny digits runs in this process (the Ray-trained members are in
test_search.py, with the one Ray instance of the suite)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from pycnn import optim
from pycnn.training import cli  # noqa: E402
from pycnn.training.config import Config  # noqa: E402
from pycnn.training.pipeline import split_data
from pycnn.training.runs import run  # noqa: E402
from pycnn.training.tools import ensemble, search, trial  # noqa: E402

TINY = ["--dataset", "digits", "--limit", "150", "--widths", "4", "--batch-size", "32", "--prefetch", "0"]
TINY_CONFIG = dict(dataset="digits", limit=150, widths=(4,), batch_size=32, prefetch=0)
quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A run with a checkpoint per epoch and a small search: members that need no training."""
    root = tmp_path_factory.mktemp("sources")
    run(Config(**TINY_CONFIG, epochs=3, crop_padding=1), root / "run", progress=False)
    spec = search.SearchSpec(base=Config(**TINY_CONFIG).to_dict(), space={"lr": {"log_uniform": [0.02, 0.2]}},
                             trials=3, epochs=2, stages=1, eta=100)
    search.run_search(spec, root / "search", log=quiet)
    return root


def test_expected_calibration_error():
    labels = np.array([0, 1, 0, 1])
    sure = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])       # confidence 1, 3 of 4 right
    assert ensemble.expected_calibration_error(sure, labels) == pytest.approx(0.25)
    calibrated = np.array([[0.75, 0.25]] * 4)                                  # 0.75 sure, 2 of 4 right
    assert ensemble.expected_calibration_error(calibrated, labels) == pytest.approx(0.25)
    assert ensemble.expected_calibration_error(np.array([[0.75, 0.25]] * 4), np.array([0, 0, 0, 1])) < 1e-12


def test_majority_vote_breaks_ties_by_mean_probability():
    probs = np.array([[[0.6, 0.4, 0.0]], [[0.0, 0.55, 0.45]], [[0.1, 0.0, 0.9]]])   # one vote each
    assert ensemble.majority_vote(probs).tolist() == [2]                           # mean: 0.23, 0.32, 0.45
    probs = np.array([[[0.9, 0.1]], [[0.45, 0.55]], [[0.4, 0.6]]])
    assert ensemble.majority_vote(probs).tolist() == [1]                           # two votes beat one sure


def test_tta_views_are_flips_and_zero_padded_shifts():
    x = np.arange(2 * 1 * 4 * 5, dtype=np.uint8).reshape(2, 1, 4, 5) + 1
    views = dict(ensemble.tta_views(["flip", "crop"], padding=1))
    assert len(views) == 10 and "identity" in views
    assert np.array_equal(views["identity"](x), x)
    assert np.array_equal(views["flip"](x), x[..., ::-1])
    down = views["shift+1+0"](x)          # the window moved down one row: row i shows row i + 1
    assert np.array_equal(down[:, :, :-1], x[:, :, 1:]) and not down[:, :, -1].any()
    right = views["flipshift+0-1"](x)
    assert np.array_equal(right[..., 1:], x[..., ::-1][..., :-1]) and not right[..., 0].any()
    with pytest.raises(ensemble.EnsembleError, match="--tta-views"):
        ensemble.tta_views(["rotate"], 1)


def test_cyclic_cosine_restarts_every_cycle():
    from pycnn import nn
    opt = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = ensemble.CyclicCosine(opt, steps_per_cycle=4)
    rates = []
    for _ in range(8):
        rates.append(schedule.lr)
        schedule.step_batch()
    assert rates[0] == pytest.approx(0.1) and rates[4] == pytest.approx(0.1)     # restarts
    assert rates[2] == pytest.approx(0.05) and rates[3] < rates[2] < rates[1] < rates[0]
    assert rates[3] == pytest.approx(0.1 * 0.5 * (1 + np.cos(0.75 * np.pi)))


def test_every_member_kind_with_tta(sources, tmp_path, capsys):
    argv = ["ensemble", "--backend", "local", "--members", "2", "--snapshots", "2", "--cycle-epochs", "1",
            "--from-search", str(sources / "search"), "--top", "2", "--from-run", str(sources / "run"), "--last", "2",
            "--epochs", "2", "--crop-padding", "1", "--tta", "--tta-views", "crop", "--run-dir", str(tmp_path / "e"),
            *TINY]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    kinds = [m["kind"] for m in report["members"]]
    assert kinds == ["seed", "seed", "snapshot", "snapshot", "search", "search", "run", "run"]
    assert report["tta"]["views"] == ["identity", "shift-1+0", "shift+1+0", "shift+0-1", "shift+0+1"]
    for m in report["members"]:
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["ece"] <= 1 and "test_accuracy_without_tta" in m
    e = report["ensemble"]
    assert {"test_accuracy", "vote_accuracy", "ece", "nll", "test_accuracy_without_tta"} <= set(e)
    assert report["margin_over_best_member"] == pytest.approx(e["test_accuracy"] - max(
        m["test_accuracy"] for m in report["members"]))
    assert report["cost"]["forward_images"] == 8 * 5 * report["test_images"]
    assert (tmp_path / "e" / "calibration.png").stat().st_size
    out = capsys.readouterr().out
    assert "ensemble (average)" in out and "margin" in out
    assert "--tta-views crop: the members did not train with these views" in out  # the search's trials
    # snapshot members are the end-of-cycle checkpoints of one run
    snaps = [m["checkpoint"] for m in report["members"] if m["kind"] == "snapshot"]
    assert [s.rsplit("/", 1)[1] for s in snaps] == ["epoch_001.npz", "epoch_002.npz"]
    # the same command again reuses the trained members: a finished member is not trained again
    folder = tmp_path / "e" / "members" / "seed_0"
    stamp = (folder / "checkpoints" / "epoch_002.npz").stat().st_mtime_ns
    config = json.loads((folder / "config.json").read_text())
    assert ensemble.train_member(config, str(folder)) == trial.read_outcome(folder).to_dict()
    assert (folder / "checkpoints" / "epoch_002.npz").stat().st_mtime_ns == stamp


def test_the_ensemble_averages_member_probabilities(sources, tmp_path):
    members = ensemble.search_members(sources / "search", top=3)
    assert [m.val_accuracy for m in members] == sorted([m.val_accuracy for m in members], reverse=True)
    report = ensemble.evaluate(members, tmp_path, log=quiet)
    splits = split_data(Config(**TINY_CONFIG))
    mean = np.mean([trial.load_predictor(m.checkpoint).probabilities(splits.test_x) for m in members], axis=0)
    assert report["ensemble"]["test_accuracy"] == pytest.approx((mean.argmax(1) == splits.test_y).mean())
    assert report["ensemble"]["ece"] == pytest.approx(ensemble.expected_calibration_error(mean, splits.test_y))


def test_contract_command_in_this_process(tmp_path, capsys):
    """Members trained without crops or flips: --tta uses no view they never saw, and says so."""
    assert cli.main(["ensemble", "--dataset", "digits", "--members", "3", "--epochs", "2", "--tta", "--backend",
                     "local", "--run-dir", str(tmp_path), *TINY[2:]]) == 0
    report = json.loads((tmp_path / "ensemble.json").read_text())
    assert len(report["members"]) == 3 and "test_accuracy" in report["ensemble"]
    assert [m["name"] for m in report["members"]] == ["seed_0", "seed_1", "seed_2"]
    assert report["tta"]["views"] == ["identity"]
    assert "no view they know; scoring without test-time augmentation" in capsys.readouterr().out


def test_tta_is_compared_both_ways_and_calibration_is_said_in_words(sources, tmp_path, capsys):
    """The members of sources/run trained with crops: the default views are the crops; the
    ensemble is compared with its best member with and without TTA; calibration in words."""
    assert cli.main(["ensemble", "--backend", "local", "--from-run", str(sources / "run"), "--last", "3", "--tta",
                     "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ensemble.json").read_text())
    assert report["tta"]["views"] == ["identity", "shift-1+0", "shift+1+0", "shift+0-1", "shift+0+1"]
    e, plain = report["ensemble"], report["best_member_without_tta"]
    best_plain = max(m["test_accuracy_without_tta"] for m in report["members"])
    assert plain["test_accuracy"] == best_plain
    assert report["margin_over_best_member_without_tta"] == pytest.approx(e["test_accuracy_without_tta"] - best_plain)
    assert "with TTA (5 views): ensemble" in out and "without TTA: ensemble" in out and "TTA itself:" in out
    words = "over-confident" if e["mean_confidence"] > e["test_accuracy"] else "under-confident"
    assert f"calibration of the ensemble: {words} (ECE {e['ece']:.3f})" in out or "well calibrated" in out
    assert ensemble.calibration_in_words(0.97, 0.69, 0.276).startswith("under-confident (ECE 0.276)")
    assert ensemble.calibration_in_words(0.80, 0.95, 0.15).startswith("over-confident (ECE 0.150)")


def test_bad_input_is_one_line_with_status_2(sources, tmp_path, capsys):
    def fails(*argv):
        status = cli.main(["ensemble", "--backend", "local", "--run-dir", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "--members" in fails()
    assert "--from-search" in fails("--top", "2")
    assert "--from-run" in fails("--from-run", str(tmp_path / "nothing"))
    assert "--top" in fails("--from-search", str(sources / "search"), "--top", "9")
    assert "--last" in fails("--from-run", str(sources / "run"), "--last", "9")
    assert "at least 2 members" in fails("--from-run", str(sources / "run"), "--last", "1")
    assert "--tta-views" in fails("--from-run", str(sources / "run"), "--last", "2", "--tta", "--tta-views", "spin")
    (tmp_path / "members" / "seed_0").mkdir(parents=True)
    (tmp_path / "members" / "seed_0" / "config.json").write_text(json.dumps(Config(lr=0.3).to_dict()))
    assert "other settings" in fails("--members", "2", *TINY)
    # settings with nothing to train were ignored; members to train on another test set were
    # trained first and refused after
    assert "--dataset: settings for members trained here" in fails("--from-run", str(sources / "run"), "--dataset",
                                                                    "cifar10")
    assert "members must share a test set" in fails("--from-run", str(sources / "run"), "--members", "1",
                                                    "--dataset", "digits", "--classes", "1,2", "--limit", "150")
    assert not (tmp_path / "members" / "seed_1").exists()
