"""The ``pycnn`` command as a user meets it: every bad input is one line naming the argument
and exit status 2 (never a traceback); Ctrl-C saves the run and --resume continues it bit
for bit; a corrupt newest checkpoint falls back to the previous one; evaluate reads the data
and pre-processing from the checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from pycnn.training import cli  # noqa: E402
from pycnn.training.config import Config
from pycnn.training.runs import run  # noqa: E402
from tests._cli_helpers import TINY, call, one_line  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    config = Config(epochs=2, widths=(4, 8), limit=200, classes=(0, 1, 2))
    history = run(config, run_dir, progress=False)
    return run_dir, history


@pytest.mark.parametrize("argv, toml, expected", [
    (["--config", "{tmp}/missing.toml"], None, "pycnn train: --config: cannot read {tmp}/missing.toml (No such file"),
    (["--config", "{tmp}/c.toml"], 'lr = "fast"\n', "pycnn train: lr must be a number > 0, got 'fast'"),
    (["--config", "{tmp}/c.toml"], "epochs = 2.5\n", "pycnn train: epochs must be an integer >= 1, got 2.5"),
    (["--config", "{tmp}/c.toml"], "epochs = [\n", "is not valid TOML"),
    (["--config", "{tmp}/c.toml"], "epochz = 3\n", "unknown keys in {tmp}/c.toml: ['epochz']"),
    (["--epochs", "2.5"], None, "pycnn train: argument --epochs: expected an integer, got '2.5'"),
    (["--lr", "fast"], None, "pycnn train: argument --lr: expected a number, got 'fast'"),
    (["--flip", "maybe"], None, "pycnn train: argument --flip: expected true or false, got 'maybe'"),
    (["--activation", "gelu"], None, "pycnn train: argument --activation: invalid choice: 'gelu'"),
    (["--epochs", "0"], None, "pycnn train: epochs must be an integer >= 1, got 0"),
    (["--crop-padding", "40"], None, "pycnn train: crop_padding must be less than half the image side (8x8 images: "
                                     "at most 3), got 40"),
    (["--widths", "4,8,16,32"], None, "pycnn train: widths has 4 stages"),
    (["--val-size", "5000"], None, "pycnn train: val_size must be at most half of the 1438 training images"),
    (["--resume", "--run-dir", "{tmp}/nowhere"], None, "pycnn train: --resume: the run directory {tmp}/nowhere does "
                                                       "not exist"),
    (["--run-dir", "{tmp}/a_file/run"], None, "pycnn train: --run-dir: cannot write to {tmp}/a_file/run"),
])
def test_bad_train_input_is_one_line_and_status_2(tmp_path, capsys, argv, toml, expected):
    (tmp_path / "a_file").write_text("not a folder")
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--run-dir" not in argv:
        argv += ["--run-dir", str(tmp_path / "run")]
    status, out, err = call(["train", "--checks", "off", *argv], capsys)
    assert status == 2
    assert expected.format(tmp=tmp_path) in one_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_bad_checkpoints_for_evaluate(tmp_path, capsys, tiny_run):
    good = (tiny_run[0] / "checkpoints" / "epoch_001.npz").read_bytes()
    cases = {"missing.npz": None, "garbage.npz": bytes(range(256)) * 4, "text.npz": b"hello\n", "empty.npz": b"",
             "truncated.npz": good[: len(good) // 2]}
    np.savez(tmp_path / "nometa.npz", a=np.zeros(3))
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    expected = {"missing.npz": "checkpoint not found", "garbage.npz": "not an .npz archive",
                "text.npz": "not an .npz archive", "empty.npz": "is empty", "truncated.npz": "is truncated or corrupt",
                "nometa.npz": "no 'meta' entry"}
    for name, message in expected.items():
        status, out, err = call(["evaluate", str(tmp_path / name)], capsys)
        line = one_line(err)
        assert status == 2 and line.startswith("pycnn evaluate: CHECKPOINT: ") and message in line, line


def test_evaluate_takes_dataset_classes_and_split_from_the_checkpoint(tiny_run, capsys):
    run_dir, history = tiny_run
    best = run_dir / "checkpoints" / f"epoch_{history['best_epoch']:03d}.npz"
    status, out, err = call(["evaluate", str(best)], capsys)  # 3 classes: the digits 0, 1, 2 only
    assert status == 0 and f"digits test, {history['test']['images']} images: loss {history['test']['loss']:.4f}, " \
                           f"accuracy {history['test']['accuracy']:.4f}" in out
    status, out, err = call(["evaluate", str(best), "--split", "val"], capsys)
    assert f"accuracy {history['val_accuracy'][history['best_epoch'] - 1]:.4f}" in out


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, tiny_run):
    source, history = tiny_run
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("epoch_001.npz", "epoch_002.npz"):
        (run_dir / "checkpoints" / name).write_bytes((source / "checkpoints" / name).read_bytes())
    (run_dir / "config.json").write_text((source / "config.json").read_text())
    newest = run_dir / "checkpoints" / "epoch_002.npz"
    newest.write_bytes(newest.read_bytes()[:1000])
    status, out, err = call(["train", "--resume", "--run-dir", str(run_dir), "--checks", "off"], capsys)
    assert status == 0, err
    assert f"warning: {newest} is truncated or corrupt" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'epoch_001.npz'} (after epoch 1)" in out
    resumed = json.loads((run_dir / "history.json").read_text())
    assert resumed["batch_loss"] == history["batch_loss"] and resumed["test"] == history["test"]
    # every checkpoint unreadable: an error, not a silent fresh start
    for path in (run_dir / "checkpoints").iterdir():
        path.write_bytes(b"junk")
    status, out, err = call(["train", "--resume", "--run-dir", str(run_dir), "--checks", "off"], capsys)
    assert status == 2 and "none of the 2 checkpoints" in err.splitlines()[-1]


def test_default_train_prints_checks_validation_per_epoch_and_test_once(tmp_path, capsys):
    status, out, err = call(["train", "--epochs", "2", "--limit", "600", "--run-dir", str(tmp_path / "r")], capsys)
    assert status == 0, err
    assert "sanity checks (pycnn check):" in out and "all checks passed" in out
    assert "first batch: data loss 2.3" in out and "(expected at the start: ln 10 = 2.3026)" in out
    assert sum(line.startswith(f"epoch {e}: ") and "validation loss" in line
               for e in (1, 2) for line in out.splitlines()) == 2
    assert out.count("test accuracy") == 1
    assert "480 training, 120 validation (held out of the training set) and 359 test images" in out
    assert "the best epoch, marked (best): the highest validation accuracy (ties: the lower validation loss)" in out


def test_cli_resume_keeps_the_saved_settings(tmp_path, capsys):
    """More epochs on resume: the step schedule continues (epoch 2 trains at a rate above 0),
    and the change is said."""
    run_dir = str(tmp_path / "r")
    assert call(["train", *TINY, "--schedule", "step", "--run-dir", run_dir], capsys)[0] == 0
    status, out, err = call(["train", "--resume", "--epochs", "2", "--run-dir", run_dir, "--profile", "--checks",
                             "off"], capsys)
    assert status == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["widths"] == [4, 8] and config["limit"] == 200 and config["epochs"] == 2
    assert (tmp_path / "r" / "checkpoints" / "epoch_002.npz").is_file()
    assert "resumed from" in out and "time spent in ops" in out and "conv3x3" in out
    assert "changed on resume: --epochs 2 (the run's: 1): the step schedule continues" in out
    assert json.loads((tmp_path / "r" / "history.json").read_text())["lr"][1] == pytest.approx(0.05)


def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: this machine may have a GPU")
    except ImportError:
        pass
    status, out, err = call(["train", *TINY, "--device", "cuda", "--run-dir", str(tmp_path)], capsys)
    assert status == 2 and "device 'cuda' needs CuPy" in one_line(err)


def test_ctrl_c_saves_the_run_and_resume_continues_bit_exactly(tmp_path, capsys):
    settings = dict(epochs=2, limit=200, batch_size=8, widths=(4, 8), prefetch=0)
    flags = ["--epochs", "2", "--limit", "200", "--batch-size", "8", "--widths", "4,8", "--prefetch", "0"]
    run_dir = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "pycnn", "train", "--checks", "off", "--run-dir", str(run_dir),
                              *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in child.stdout:
        if line.startswith("first batch"):
            child.send_signal(signal.SIGINT)  # the first batch is done
            break
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pycnn train: interrupted: saved ") and "--resume" in last and "Traceback" not in err
    parts = list((run_dir / "checkpoints").glob("epoch_*_part_*.npz"))
    assert len(parts) == 1, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    history = json.loads((run_dir / "history.json").read_text())
    assert history["interrupted"] == str(parts[0]) and len(history["batch_loss"]) >= 1
    for figure in ("loss.png", "accuracy.png", "lr.png"):
        assert (run_dir / figure).stat().st_size > 1000

    status, out, err = call(["train", "--resume", "--run-dir", str(run_dir), "--checks", "off"], capsys)
    assert status == 0, err
    whole = run(Config(**settings), tmp_path / "whole", progress=False)
    resumed = json.loads((run_dir / "history.json").read_text())
    for key in whole:
        if key not in ("epoch_seconds", "images_per_second"):
            assert resumed[key] == whole[key], key
    a = np.load(tmp_path / "whole" / "checkpoints" / "epoch_002.npz")
    b = np.load(run_dir / "checkpoints" / "epoch_002.npz")
    for key in a.files:
        if key != "meta":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_every_setting_has_a_help_line_and_its_default_as_typed():
    import dataclasses

    from pycnn.training.config import Config
    assert set(Config.HELP) == {f.name for f in dataclasses.fields(Config)}
    out = subprocess.run([sys.executable, "-m", "pycnn", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "channels of each stage" in out and "(default: 16,32)" in out and "(default: true)" in out
    assert "(16, 32)" not in out


def test_check_refuses_a_device_it_does_not_run_on(capsys):
    """pycnn check --device cuda ran its checks on the CPU without a word."""
    assert cli.main(["check", "--device", "cuda"]) == 2
    assert "pycnn check runs its checks on the CPU" in capsys.readouterr().err


def test_an_empty_profile_totals_zero():
    import pycnn
    with pycnn.profile() as timings:
        pass
    assert timings.table().splitlines()[-1].split()[-1] == "0.000"
