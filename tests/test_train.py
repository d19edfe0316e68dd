"""Training runs end to end on the embedded real digits: accuracy, exact resume, run
directory, early stopping, the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("sklearn")

from pycnn import cli, trainer as trainer_module  # noqa: E402
from pycnn.train import Config, evaluate_checkpoint, run  # noqa: E402


def quick(**overrides) -> Config:
    base = dict(limit=600, epochs=2, widths=(8, 16), batch_size=32, flip=False, crop_padding=1, rotation=5.0,
                schedule="cosine", warmup_steps=5)
    return Config(**{**base, **overrides})


def test_digits_reach_a_stated_accuracy_quickly(tmp_path):
    history = run(Config(epochs=4, widths=(8, 16)), tmp_path / "run", progress=False)
    assert history["stopped"] is None
    assert history["val_accuracy"][-1] >= 0.93  # measured 0.96-0.97; a broken op falls far below
    for name in ("config.json", "history.json", "history.csv", "loss.png", "accuracy.png",
                 "checkpoints/epoch_004.npz"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    whole = run(quick(), tmp_path / "whole", progress=False)
    # a run that died right after writing its first checkpoint
    (tmp_path / "split" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "checkpoints" / "epoch_001.npz", tmp_path / "split" / "checkpoints")
    resumed = run(quick(prefetch=0), tmp_path / "split", resume=True, progress=False)
    assert resumed["batch_loss"] == whole["batch_loss"]
    assert resumed["val_accuracy"] == whole["val_accuracy"]
    a = np.load(tmp_path / "whole" / "checkpoints" / "epoch_002.npz")
    b = np.load(tmp_path / "split" / "checkpoints" / "epoch_002.npz")
    for key in a.files:
        if key.startswith(("model/", "optim/")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_checkpoint_evaluates_to_the_recorded_accuracy(tmp_path):
    history = run(quick(epochs=1), tmp_path / "run", progress=False)
    loss, accuracy = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_001.npz")
    assert accuracy == pytest.approx(history["val_accuracy"][-1])
    assert loss == pytest.approx(history["val_loss"][-1], rel=1e-5)


def test_checkpoints_contain_no_pickle(tmp_path):
    run(quick(epochs=1), tmp_path / "run", progress=False)
    with np.load(tmp_path / "run" / "checkpoints" / "epoch_001.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def test_exploding_loss_stops_the_run(tmp_path):
    history = run(quick(lr=50.0, epochs=3, schedule="none", warmup_steps=0), tmp_path / "run", progress=False)
    assert history["stopped"] is not None
    assert "initial value" in history["stopped"] or "nan" in history["stopped"].lower()


def test_hinge_loss_adam_plateau_and_balanced_sampling_train(tmp_path):
    history = run(quick(loss="hinge", optimizer="adam", lr=0.003, schedule="plateau", balance="upsample",
                        activation="prelu", max_norm=3.0), tmp_path / "run", progress=False)
    assert history["stopped"] is None and history["val_accuracy"][-1] > 0.5


def test_atomic_checkpoint_leaves_no_partial_file(tmp_path, monkeypatch):
    run(quick(epochs=1), tmp_path / "run", progress=False)

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        run(quick(epochs=2), tmp_path / "run", resume=True, progress=False)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["epoch_001.npz"]


def test_cli_train_config_file_and_evaluate(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\nwidths = [4, 8]\nlimit = 300\n')
    assert cli.main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--lr", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.02
    assert cli.main(["evaluate", str(tmp_path / "r" / "checkpoints" / "epoch_001.npz")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_resume_keeps_the_saved_settings(tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    assert cli.main(["train", "--epochs", "1", "--widths", "4,8", "--limit", "200", "--run-dir", run_dir]) == 0
    assert cli.main(["train", "--resume", "--epochs", "2", "--run-dir", run_dir, "--profile"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["widths"] == [4, 8] and config["limit"] == 200 and config["epochs"] == 2
    assert (tmp_path / "r" / "checkpoints" / "epoch_002.npz").is_file()
    out = capsys.readouterr().out
    assert "resumed from" in out and "time spent in ops" in out and "conv3x3" in out


def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: this machine may have a GPU")
    except ImportError:
        pass
    assert cli.main(["train", "--device", "cuda", "--epochs", "1", "--run-dir", str(tmp_path)]) == 2
    assert "device 'cuda' needs CuPy" in capsys.readouterr().err


def test_cli_rejects_bad_settings(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "0", "--run-dir", str(tmp_path)]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--activation", "swish"])
