"""A user's runs are their data: a new run never deletes another run's files (a run directory
that holds a run is refused unless --resume or --overwrite; without --run-dir every run gets
its own folder and runs/latest points at the newest); --resume refuses changed settings
except the safe ones, and says when there is nothing to do; device and run-directory
problems are one line and exit 2 before anything is written; evaluate takes a run
directory and reports images, per-class accuracy and the confusion matrix; every flag has
help text."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import types

import pytest

pytest.importorskip("sklearn")

from pycnn.training import cli, rundir  # noqa: E402
from pycnn.training import config as config_module
from tests._cli_helpers import TINY, call, one_line  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def snapshot(folder) -> dict:
    """Every file under FOLDER with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run (cosine schedule, the default)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *TINY, "--classes", "0,1,2", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_a_new_run_in_a_run_directory_is_refused_and_deletes_nothing(tmp_path, capsys, finished):
    run_dir = tmp_path / "run"
    assert call(["train", *TINY, "--run-dir", str(run_dir)], capsys)[0] == 0
    before = snapshot(run_dir)
    status, out, err = call(["train", *TINY, "--lr", "0.01", "--run-dir", str(run_dir)], capsys)
    line = one_line(err)
    assert status == 2 and f"--run-dir: {run_dir} already holds a run (config.json, history.json, 1 checkpoint)" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(run_dir) == before and out == ""
    # asked: replaced, and said
    status, out, err = call(["train", *TINY, "--lr", "0.01", "--run-dir", str(run_dir), "--overwrite"], capsys)
    assert status == 0, err
    assert f"--overwrite: deleted the 1 checkpoints of the run that was in {run_dir}" in out
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.01
    status, out, err = call(["train", *TINY, "--run-dir", str(run_dir), "--overwrite", "--resume"], capsys)
    assert status == 2 and "exclude each other" in one_line(err)


def test_without_run_dir_every_run_gets_its_own_folder_and_latest_points_at_the_newest(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    stamps = iter(["20260101-120000", "20260101-120000", "20260101-120001"])
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: next(stamps))
    for _ in range(2):  # the second in the same second: a suffix, not a refusal
        status, out, err = call(["train", *TINY], capsys)
        assert status == 0, err
    first, second = tmp_path / "runs" / "20260101-120000", tmp_path / "runs" / "20260101-120000-2"
    assert (first / "checkpoints" / "epoch_001.npz").is_file() and (second / "checkpoints" / "epoch_001.npz").is_file()
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == second.resolve()
    assert f"run directory {second.relative_to(tmp_path)}" in out
    # --resume alone continues runs/latest: finished, so nothing to do
    status, out, err = call(["train", "--resume", "--checks", "off"], capsys)
    assert status == 0 and "nothing to do:" in out and str(second.relative_to(tmp_path)) in out
    # evaluate takes the run directory
    status, out, err = call(["evaluate", "runs/latest"], capsys)
    assert status == 0 and "epoch_001.npz" in out, err


def test_an_old_real_latest_folder_is_left_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    (tmp_path / "runs" / "latest" / "config.json").write_text("{}")
    status, out, err = call(["train", *TINY], capsys)
    assert status == 0, err
    assert "runs/latest is a folder, not a link" in out
    assert (tmp_path / "runs" / "latest" / "config.json").read_text() == "{}"


def test_resume_refuses_changed_settings_in_one_line_and_changes_nothing(capsys, finished):
    before = snapshot(finished)
    status, out, err = call(["train", "--resume", "--run-dir", str(finished), "--lr", "0.1", "--momentum", "0.5"],
                            capsys)
    line = one_line(err)
    assert status == 2 and "--lr 0.1 (the run's: 0.05), --momentum 0.5 (the run's: 0.9)" in line
    assert "--epochs" in line  # what may change
    status, out, err = call(["train", "--resume", "--run-dir", str(finished), "--epochs", "3"], capsys)
    line = one_line(err)
    assert status == 2 and "cosine schedule" in line and "rate 0" not in out
    assert snapshot(finished) == before


def test_resuming_a_finished_run_says_there_is_nothing_to_do(capsys, finished):
    before = snapshot(finished)
    status, out, err = call(["train", "--resume", "--run-dir", str(finished)], capsys)
    assert status == 0, err
    assert out.startswith(f"nothing to do: {finished} is finished (all 1 of its epochs are trained)")
    assert "test accuracy" in out and "sanity checks" not in out
    assert snapshot(finished) == before


def test_resume_says_which_safe_settings_change(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert call(["train", *TINY, "--epochs", "2", "--schedule", "step", "--run-dir", str(run_dir)], capsys)[0] == 0
    for name in ("epoch_002.npz",):
        (run_dir / "checkpoints" / name).unlink()  # as if it stopped after epoch 1
    status, out, err = call(["train", "--resume", "--run-dir", str(run_dir), "--checks", "off", "--prefetch", "0"],
                            capsys)
    assert status == 0, err
    assert "changed on resume: --prefetch 0 (the run's: 2): it changes how batches are prepared, not which" in out
    status, out, err = call(["train", "--resume", "--run-dir", str(run_dir), "--epochs", "1"], capsys)
    assert status == 2 and "has already trained 2 epochs" in one_line(err)


def test_ctrl_c_while_starting_is_one_line_and_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    status, out, err = call(["train"], capsys)
    assert status == 130 and "interrupted" in one_line(err)


def test_ctrl_c_while_the_command_imports_is_one_line_and_130(tmp_path):
    """The pycnn command's process (argv[0] 'pycnn'): SIGINT while its modules import (here:
    right after pycnn's first module, with the whole package still to come) ends it quietly."""
    script = ("import os, signal, sys, time\n"
              "sys.argv[0] = 'pycnn'\n"
              "import pycnn._startup\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(5)\n"
              "import pycnn.training.cli\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "pycnn: interrupted while starting (nothing was written)"
    first = [line for line in (REPO / "pycnn" / "__init__.py").read_text().splitlines()
             if line.startswith(("import ", "from "))][0]
    assert first.startswith("from pycnn import _startup"), "pycnn/__init__.py must import _startup first"
    # main() gives Ctrl-C back to Python; a library user's process is never touched
    check = "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    script = ("import signal, sys\n"
              "sys.argv[0] = 'pycnn'\n"
              "from pycnn.training import cli\n" + check +
              "cli.main(['evaluate', '/nonexistent.npz'])\n" + check)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr
    script = "import signal\nimport pycnn.training.cli\n" + check
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True"], done.stderr


# ---------------------------------------------------------------------------------- devices

def _without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError


def _fake_cupy(monkeypatch, error: str | None, count: int = 1):
    def count_devices():
        if error:
            raise RuntimeError(error)
        return count

    runtime = types.SimpleNamespace(getDeviceCount=count_devices)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))


@pytest.mark.parametrize("setup, words", [
    (_without_cupy, "device 'cuda' needs CuPy, which is not installed: pip install 'pycnn[cuda]'"),
    (lambda m: _fake_cupy(m, "cudaErrorNoDevice: no CUDA-capable device is detected"),
     "CuPy is installed but no NVIDIA GPU is visible"),
    (lambda m: _fake_cupy(m, "cudaErrorInsufficientDriver: CUDA driver version is insufficient"),
     "the NVIDIA driver is older than the CUDA runtime of this CuPy"),
    (lambda m: _fake_cupy(m, None, count=0), "no NVIDIA GPU is visible"),
])
def test_cuda_without_a_usable_gpu_fails_at_once_and_leaves_nothing(tmp_path, capsys, monkeypatch, setup, words):
    setup(monkeypatch)
    run_dir = tmp_path / "new"
    start = time.perf_counter()
    status, out, err = call(["train", "--device", "cuda", "--run-dir", str(run_dir)], capsys)  # checks on
    assert time.perf_counter() - start < 1.0
    assert status == 2 and words in one_line(err) and out == ""
    assert not run_dir.exists()


@pytest.mark.parametrize("command", [
    ["search", "--backend", "local", "--trials", "2"],
    ["ensemble", "--backend", "local", "--members", "2"],
    ["imbalance", "--backend", "local"],
])
def test_every_command_says_an_environment_problem_with_status_2(tmp_path, capsys, monkeypatch, command):
    _without_cupy(monkeypatch)
    status, out, err = call([*command, "--device", "cuda", "--run-dir", str(tmp_path / "new")], capsys)
    assert status == 2 and "needs CuPy" in one_line(err) and not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("not a folder")
    status, out, err = call([*command, "--run-dir", str(tmp_path / "a_file" / "run")], capsys)
    assert status == 2 and "--run-dir: cannot write to" in one_line(err)


@pytest.mark.parametrize("command", [
    ["train", *TINY],
    ["search", "--backend", "local", "--trials", "2", *TINY[:-2]],
    ["ensemble", "--backend", "local", "--members", "2", *TINY[:-2]],
    ["imbalance", "--backend", "local", *TINY[:-2]],
])
def test_a_read_only_run_directory_is_status_2_before_anything_runs(tmp_path, capsys, monkeypatch, command):
    """(As root, chmod does not make a folder read-only: a read-only file system is simulated.)"""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", read_only)
    status, out, err = call([*command, "--run-dir", str(tmp_path / "new")], capsys)
    line = one_line(err)
    assert status == 2 and f"--run-dir: cannot write to {tmp_path / 'new'}" in line and "Read-only file system" in line
    assert not (tmp_path / "new").exists()


def test_finetune_refuses_a_run_directory_that_holds_a_run(tmp_path, capsys, finished):
    target = tmp_path / "tuned"
    (target / "checkpoints").mkdir(parents=True)
    (target / "checkpoints" / "epoch_001.npz").write_bytes(b"someone's")
    status, out, err = call(["finetune", str(finished / "checkpoints" / "epoch_001.npz"), "--preset",
                             "similar-large", "--epochs", "1", "--run-dir", str(target)], capsys)
    line = one_line(err)
    assert status == 2 and "already holds a run" in line and "--overwrite" in line
    assert (target / "checkpoints" / "epoch_001.npz").read_bytes() == b"someone's"


# --------------------------------------------------------------------------------- evaluate

def test_evaluate_a_run_directory_reports_images_per_class_and_the_confusion_matrix(capsys, finished):
    history = json.loads((finished / "history.json").read_text())
    status, out, err = call(["evaluate", str(finished)], capsys)
    assert status == 0, err
    best = finished / "checkpoints" / f"epoch_{history['best_epoch']:03d}.npz"
    lines = out.splitlines()
    assert lines[0].startswith(f"{best} (epoch 1: the best epoch by validation accuracy): digits test, "
                               f"{history['test']['images']} images: loss {history['test']['loss']:.4f}, accuracy "
                               f"{history['test']['accuracy']:.4f}")
    assert lines[1] == "per-class accuracy (images):" and len([x for x in lines if x.startswith("  ")]) == 3 + 4
    assert "confusion matrix (rows: true class, columns: predicted):" in out
    rows = lines[lines.index("confusion matrix (rows: true class, columns: predicted):") + 2:][:3]
    assert sum(int(v) for row in rows for v in row.split()[1:]) == history["test"]["images"]
    figure = finished / "confusion_test_epoch_001.png"
    assert figure.stat().st_size > 1000 and f"figure: {figure}" in out
    status, out, err = call(["evaluate", str(finished.parent)], capsys)
    assert status == 2 and "holds no finished epoch's checkpoint" in one_line(err)


# ------------------------------------------------------------------------------------ help

def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_argument_of_every_command_has_help_text():
    parser = cli.build_parser()
    missing = []
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {action.dest}")
    assert not missing


def test_version_and_help_without_markup():
    out = subprocess.run([sys.executable, "-m", "pycnn", "--version"], capture_output=True, text=True, check=True)
    import pycnn
    assert out.stdout.strip() == f"pycnn {pycnn.__version__}"
    text = subprocess.run([sys.executable, "-m", "pycnn", "--help"], capture_output=True, text=True,
                          check=True).stdout
    assert "``" not in text and "pycnn train" in text
    train = subprocess.run([sys.executable, "-m", "pycnn", "train", "--help"], capture_output=True, text=True,
                           check=True, env={**os.environ, "COLUMNS": "120"}).stdout
    assert "runs/latest" in train and "--overwrite" in train and "nothing to do" in train


def test_check_device_passes_cpu():
    config_module.check_device("cpu")
