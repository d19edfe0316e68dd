"""pycnn search: the space (TOML, --param), the successive-halving rule, coarse to fine with
the edge warning, a local search end to end (a diverging trial aborted by the 3x rule), an
interrupted search resumed to the same results, bad input, and ONE real local-Ray test
(the search contract and Ray-trained ensemble members on one Ray instance)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal

import pytest

pytest.importorskip("sklearn")

from pycnn.training import cli  # noqa: E402
from pycnn.training.config import Config  # noqa: E402
from pycnn.training.tools import raytune, search  # noqa: E402
from pycnn.training.tools.search import Halving, SearchError, SearchSpec, TrialSpec, narrow, parse_param  # noqa: E402

# 150 digits (30 held out for validation), one stage of 4 channels: an epoch is a few batches
TINY = ["--dataset", "digits", "--limit", "150", "--widths", "4", "--batch-size", "32", "--prefetch", "0"]
TINY_CONFIG = dict(dataset="digits", limit=150, widths=(4,), batch_size=32, prefetch=0)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------- the space

def test_param_flags_and_toml_space_give_checked_distributions(tmp_path):
    assert parse_param("lr=log:1e-4,1e-1").values == (1e-4, 1e-1)
    assert parse_param("dropout=uniform:0,0.5").kind == "uniform"
    assert parse_param("batch-size=choice:32,64").values == (32, 64)
    assert parse_param("widths=choice:4/8,8/16").values == ((4, 8), (8, 16))
    for bad, named in (("lr=log:-1,1", "lr"), ("lr=log:1,0.1", "lr"), ("colour=choice:1", "colour"),
                       ("epochs=choice:1,2", "epochs"), ("activation=uniform:0,1", "activation"),
                       ("dropout=uniform:0,2", "dropout"), ("lr", "--param")):
        with pytest.raises(SearchError, match=named):
            parse_param(bad)
    space = search.parse_space({"lr": {"log_uniform": [1e-3, 1.0]}, "optimizer": {"choice": ["sgd", "adam"]}}, "f")
    import numpy as np
    rng = np.random.default_rng(0)
    drawn = [space["lr"].sample(rng) for _ in range(2000)]
    assert 1e-3 <= min(drawn) and max(drawn) <= 1.0
    # log-uniform: each decade gets about a third of the draws
    decades = np.histogram(np.log10(drawn), bins=[-3, -2, -1, 0])[0] / len(drawn)
    assert np.allclose(decades, 1 / 3, atol=0.05)
    assert isinstance(search.make_dist("batch_size", "log_uniform", [16, 128]).sample(rng), int)


def test_halving_cuts_below_the_rung_quantile():
    rule = Halving(max_epochs=9, grace=1, eta=3)
    assert sorted(rule.rungs) == [1, 3]
    assert rule.record("a", 1, 0.5)           # first at the rung: nothing to compare with
    assert not rule.record("b", 1, 0.4)       # below the 2/3 quantile of [0.5]
    assert rule.record("c", 1, 0.6)
    assert rule.record("a", 2, 0.1)           # not a rung
    assert rule.record("a", 1, 0.0)           # already recorded there: its decision stands
    rebuilt = Halving(max_epochs=9, grace=1, eta=3)
    rebuilt.replay("a", [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}])
    assert not rebuilt.record("b", 1, 0.4)    # the records survive a restart


def test_narrowing_follows_the_best_trials_and_warns_at_an_edge():
    space = {"lr": search.make_dist("lr", "log_uniform", [1e-4, 1.0]),
             "weight_decay": search.make_dist("weight_decay", "log_uniform", [1e-6, 1e-2]),
             "optimizer": search.make_dist("optimizer", "choice", ["sgd", "adam"])}
    trials = [(TrialSpec(1, i, {"lr": lr, "weight_decay": wd, "optimizer": opt}, {}, ""), acc)
              for i, (lr, wd, opt, acc) in enumerate([(0.9, 1e-4, "sgd", 0.9), (0.5, 3e-4, "sgd", 0.85),
                                                      (1e-3, 1e-5, "adam", 0.3), (2e-4, 1e-3, "adam", 0.2)])]
    new, warnings = narrow(space, trials, top=2)
    assert len(warnings) == 1 and "lr" in warnings[0] and "upper edge" in warnings[0]
    assert new["lr"].values[1] > 1.0              # extended past the edge the best value sits on
    assert new["lr"].values[0] > 1e-2             # and narrowed below
    low, high = new["weight_decay"].values
    assert 1e-6 <= low < 1e-4 and 3e-4 < high <= 1e-2
    assert new["optimizer"].values == ("sgd",)


# ---------------------------------------------------------------------------- local searches

def test_local_search_two_stages_aborts_diverging_trials(tmp_path, capsys):
    run_dir = tmp_path / "search"
    status = cli.main(["search", "--backend", "local", "--trials", "4", "--epochs", "2", "--run-dir", str(run_dir),
                       "--param", "lr=choice:0.05,0.2,1e4", "--param", "weight_decay=log:1e-5,1e-2", *TINY])
    out = capsys.readouterr().out
    assert status == 0
    table = rows(run_dir / "results.csv")
    assert [(r["stage"], r["trial"]) for r in table] == [("1", "0"), ("1", "1"), ("1", "2"), ("1", "3"),
                                                         ("2", "0"), ("2", "1")]
    assert {r["status"] for r in table} <= {"finished", "aborted"}
    diverged = [r for r in table if r["reason"].startswith("diverged")]
    assert diverged and all(float(r["lr"]) == 1e4 and r["status"] == "aborted" for r in diverged)
    assert all(float(r["lr"]) != 1e4 for r in table if r["stage"] == "2")   # the next stage drops it
    assert all(r["epochs"] == "4" for r in table if r["stage"] == "2" and r["status"] == "finished")
    summary = json.loads((run_dir / "search.json").read_text())
    assert 0 <= summary["test"]["accuracy"] <= 1 and summary["best"]["val_accuracy"] > 0.2
    best = Config.from_toml(run_dir / "best.toml")
    assert best.lr == pytest.approx(summary["best"]["values"]["lr"])
    assert (run_dir / "search_scatter.png").stat().st_size and (run_dir / "search_curves.png").stat().st_size
    assert "measured once" in out and "pycnn train --config" in out


def _spec(**extra):
    return SearchSpec(**{"base": Config(**TINY_CONFIG).to_dict(), "space": {"lr": {"log_uniform": [0.01, 0.3]}},
                         "trials": 3, "epochs": 2, "stages": 1, **extra})


def test_interrupted_search_resumes_to_the_same_results(tmp_path, monkeypatch):
    quiet = lambda *a, **k: None  # noqa: E731
    search.run_search(_spec(), tmp_path / "whole", log=quiet)
    expected = rows(tmp_path / "whole" / "results.csv")

    from pycnn.training.trainer import Trainer
    original, steps = Trainer._check_divergence, []

    def ctrl_c_at_step_10(self, value, data_loss):  # Ctrl-C in the middle of trial 1's first epoch
        steps.append(1)
        if len(steps) == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, value, data_loss)

    monkeypatch.setattr(Trainer, "_check_divergence", ctrl_c_at_step_10)
    with pytest.raises(search.SearchInterrupted):
        search.run_search(_spec(), tmp_path / "cut", log=quiet)
    monkeypatch.setattr(Trainer, "_check_divergence", original)
    assert list((tmp_path / "cut" / "stage_1" / "trial_001" / "checkpoints").glob("epoch_001_part_*.npz"))
    assert rows(tmp_path / "cut" / "results.csv")[1]["status"] == "unfinished"
    with pytest.raises(SearchError, match="--resume"):
        search.run_search(_spec(), tmp_path / "cut", log=quiet)
    search.run_search(_spec(trials=99), tmp_path / "cut", resume=True, log=quiet)  # the saved spec wins
    resumed = rows(tmp_path / "cut" / "results.csv")
    key = ("stage", "trial", "status", "val_accuracy", "best_epoch", "epochs", "lr", "reason")
    assert [[r[k] for k in key] for r in resumed] == [[r[k] for k in key] for r in expected]


def test_bad_input_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    def fails(*argv):
        status = cli.main(list(argv))
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "--param" in fails("search", "--backend", "local", "--param", "lr=log:0,1", "--run-dir", str(tmp_path))
    assert "--resume" in fails("search", "--backend", "local", "--resume", "--run-dir", str(tmp_path / "none"))
    assert "val" in fails("search", "--backend", "local", "--val-size", "0", "--run-dir", str(tmp_path / "v"))
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = 0.1\n[space]\nmomentum = {gaussian = [0, 1]}\n')
    assert "momentum" in fails("search", "--backend", "local", "--config", str(bad), "--run-dir", str(tmp_path / "t"))
    monkeypatch.setattr(raytune, "available", lambda: False)
    assert 'pip install "pycnn[ray]"' in fails("search", "--run-dir", str(tmp_path / "r"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["search", "--trials", "0"])
    assert exc.value.code == 2 and "--trials" in capsys.readouterr().err


# ------------------------------------------------------------------------- the one Ray test

def test_search_and_ensemble_contracts_on_a_local_ray_instance(tmp_path, capsys):
    pytest.importorskip("ray", reason=raytune.INSTALL_HINT)
    import ray

    with raytune.session(cpus=2, threads=1):      # one local instance for both commands
        assert ray.cluster_resources()["CPU"] == 2
        capsys.readouterr()
        status = cli.main(["search", "--dataset", "digits", "--trials", "4", "--epochs", "2", "--run-dir",
                           str(tmp_path / "s"), "--stages", "1", *TINY[2:]])
        out = capsys.readouterr()
        assert status == 0, out.err
        assert "4 trials on Ray, 2 at a time (1 CPU thread each)" in out.out
        table = rows(tmp_path / "s" / "results.csv")
        assert len(table) == 4 and {r["status"] for r in table} <= {"finished", "aborted"}
        assert all(0 <= float(r["val_accuracy"]) <= 1 and float(r["lr"]) > 0 for r in table)
        status = cli.main(["ensemble", "--dataset", "digits", "--members", "3", "--epochs", "2", "--tta",
                           "--run-dir", str(tmp_path / "e"), *TINY[2:]])
        assert status == 0, capsys.readouterr().err
    assert not ray.is_initialized()
    report = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    assert len(report["members"]) == 3 and all(0 <= m["test_accuracy"] <= 1 for m in report["members"])
    assert 0 <= report["ensemble"]["test_accuracy"] <= 1


def test_integer_settings_take_whole_number_choices_only():
    """batch_size=choice:a,b ended in a traceback (round of a str) and 1.5 was rounded to 2."""
    for text in ("batch_size=choice:a,b", "batch_size=choice:1.5,2"):
        with pytest.raises(SearchError, match="needs whole numbers"):
            parse_param(text)
    assert parse_param("batch_size=choice:32,64").values == (32, 64)


def test_ray_flags_with_the_local_backend_are_refused(tmp_path, capsys):
    assert cli.main(["search", "--backend", "local", "--address", "auto", "--epochs", "1", "--trials", "1",
                     "--run-dir", str(tmp_path / "s")]) == 2
    assert "--address: only for --backend ray" in capsys.readouterr().err


def test_search_figures_show_diverged_trials_apart_and_whole_epochs(tmp_path, monkeypatch):
    """Diverged trials were drawn at accuracy 0 (squashing the others into a line at the top),
    and the curves' epoch axis had ticks at 1.5, 2.5."""
    import matplotlib.pyplot as plt

    from pycnn.training.tools import plots
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    plt.close("all")
    space = {"lr": search.make_dist("lr", "log_uniform", [1e-3, 1.0])}
    rows = [{"stage": 1, "status": "finished", "val_accuracy": 0.9 + i / 100, "lr": 10 ** -(i + 1)} for i in range(3)]
    rows.append({"stage": 1, "status": "aborted", "val_accuracy": None, "lr": 0.9})
    curve = [{"epoch": e, "val_accuracy": 0.8 + e / 100, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    spec = TrialSpec(1, 0, {"lr": 0.01}, {}, str(tmp_path))
    plots.search_figures(rows, [(spec, curve)], space, tmp_path)
    scatter, curves = [plt.figure(n) for n in plt.get_fignums()[-2:]]
    low, high = scatter.axes[0].get_ylim()
    assert low > 0.8 and high <= 1.0
    labels = scatter.axes[0].get_legend_handles_labels()[1]
    assert "diverged (1, no accuracy)" in labels
    ticks = [t for t in curves.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close("all")


def test_resume_refuses_flags_that_would_change_the_search(tmp_path, capsys):
    """--resume continued the saved search and silently ignored flags such as --trials 99."""
    spec = SearchSpec(base=Config(epochs=3).to_dict(), space={"lr": {"log_uniform": [1e-3, 1.0]}}, trials=4)
    (tmp_path / "search.json").write_text(json.dumps({"spec": dataclasses.asdict(spec)}))
    for flags, words in ((["--trials", "99"], "--trials 99 (the search's: 4)"),
                         (["--lr", "0.3"], "--lr 0.3 (the search's: 0.05)"),
                         (["--epochs", "5"], "--epochs 5 (the search's: 3)")):
        status = cli.main(["search", "--backend", "local", "--resume", "--run-dir", str(tmp_path), *flags])
        err = capsys.readouterr().err.strip()
        assert status == 2 and "\n" not in err and words in err and "continues with its own settings" in err, err
