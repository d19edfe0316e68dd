"""`pycnn bench`: runs, checks its cases and writes the documented JSON rows (no timing
assertions: the machine is shared and noisy)."""
from __future__ import annotations

import json

import pytest

from pycnn.bench import harness as benchmarks
from pycnn.training import cli

pytest.importorskip("pycnn._C")

NUMBER_OR_NONE = (int, float, type(None))


def test_bench_quick_writes_the_rows_as_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--ops", "relu,max_pool2x2", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows
    assert {row["op"] for row in rows} == {"relu", "max_pool2x2"}
    assert {row["pass"] for row in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        assert list(row) == list(benchmarks.JSON_KEYS)
        assert set(row) == {"op", "algo", "shape", "pass", "pycnn_ms", "torch_ms", "speedup", "gbps", "gflops",
                            "limit_fraction", "pycnn_spread"}
        assert row["pycnn_spread"] >= 0
        for key in ("op", "algo", "shape", "pass"):
            assert isinstance(row[key], str)
        for key in ("pycnn_ms", "torch_ms", "speedup", "gbps", "gflops", "limit_fraction"):
            assert isinstance(row[key], NUMBER_OR_NONE), key
        assert row["pycnn_ms"] > 0 and row["gbps"] > 0 and row["gflops"] is None
    table = capsys.readouterr().out
    assert "pycnn ms" in table and "relu" in table and "max_pool2x2" in table
    assert f"correctness: all {len(rows)} checked cases matched the float64 NumPy reference" in table
    assert "run-to-run spread of pycnn's timed runs (interquartile range / median): median " in table
    assert "load average " in table and " CPUs" in table


def test_bench_table_explains_a_limit_above_one_and_a_busy_machine():
    row = benchmarks.Row("conv3x3", "winograd", "32x64x32x32 K64", "fwd", 1.0, 2.0, 2.0, None, 300.0, 1.45, 0.04)
    facts = {"threads": 2, "torch": "2.13.0", "fma_peak_gflops": 207.0, "load_before": 5.2, "load_after": 6.0,
             "cpus": 2, "checked": 1, "torch_checked": 1}
    text = benchmarks.table([row], facts)
    assert "of limit above 1 (1 row, up to 1.45 for conv3x3 winograd fwd): the case is credited with the direct " \
           "convolution's FLOPs" in text
    assert "load average 5.20 before, 6.00 after, on 2 CPUs; the machine was busy" in text
    assert "worst 4% (conv3x3 winograd" in text
    assert "pycnn matched PyTorch on 1 (shape, pass) pairs" in text


def test_a_failed_correctness_check_is_one_line_and_status_1(capsys, monkeypatch):
    def mismatch(**kwargs):
        raise AssertionError("\nNot equal to tolerance rtol=1e-05\nrelu y\nMismatched elements: 3 / 10")

    monkeypatch.setattr(benchmarks, "run", mismatch)
    assert cli.main(["bench", "--quick", "--ops", "relu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pycnn bench: a correctness check failed") and "\n" not in err and "relu y" in err


def test_bench_without_torch_leaves_its_columns_empty(tmp_path):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--ops", "relu", "--no-torch", "--json", str(path)]) == 0
    for row in json.loads(path.read_text()):
        assert row["torch_ms"] is None and row["speedup"] is None and row["limit_fraction"] > 0


def test_bench_rejects_an_unknown_op(capsys):
    assert cli.main(["bench", "--quick", "--ops", "relu,nosuchop"]) == 2
    assert "nosuchop" in capsys.readouterr().err


def test_cases_are_generated_from_the_specs():
    from pycnn.ops import registry
    full = benchmarks.cases()
    conv = registry.get("conv3x3")
    assert {(c.index, c.algo) for c in full if c.op == "conv3x3"} == {
        (i, a) for i, case in enumerate(conv.bench) if case.where == "cpu"
        for a in ("direct", "winograd", "winograd4", "auto")}
    for op in ("max_pool2x2", "avg_pool2x2", "relu", "swish"):
        assert {c.shape for c in full if c.op == op} == {case.shapes for case in registry.get(op).bench_cases("cpu")}
    assert {c.op for c in full if c.unfused} == {"conv3x3+relu", "batchnorm+relu"}


def test_bench_refuses_an_unwritable_json_path_and_empty_ops_before_measuring(tmp_path, capsys, monkeypatch):
    """One line and exit 2 before any case runs (it used to measure for minutes, then fail
    with a traceback on the write); '--ops ""' named no op and ran them all."""
    monkeypatch.setattr(benchmarks, "run", lambda **kwargs: pytest.fail("measured before checking its arguments"))
    for bad in (str(tmp_path / "missing" / "b.json"), str(tmp_path)):
        assert cli.main(["bench", "--quick", "--ops", "relu", "--json", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pycnn bench: --json cannot write") and "\n" not in err
    assert cli.main(["bench", "--quick", "--ops", " , "]) == 2
    assert "--ops must name at least one op" in capsys.readouterr().err


def test_bench_table_says_torch_was_left_out():
    rows, facts = benchmarks.run(quick=True, ops=["relu"], use_torch=False)
    assert "left out: --no-torch" in benchmarks.table(rows[:1], facts)
