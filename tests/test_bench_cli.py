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
    assert cli.main(["bench", "--quick", "--ops", "relu,maxpool2x2", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows
    assert {row["op"] for row in rows} == {"relu", "maxpool2x2"}
    assert {row["pass"] for row in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        assert list(row) == list(benchmarks.JSON_KEYS)
        assert set(row) == {"op", "algo", "shape", "pass", "pycnn_ms", "torch_ms", "speedup", "gbps", "gflops",
                            "limit_fraction"}
        for key in ("op", "algo", "shape", "pass"):
            assert isinstance(row[key], str)
        for key in ("pycnn_ms", "torch_ms", "speedup", "gbps", "gflops", "limit_fraction"):
            assert isinstance(row[key], NUMBER_OR_NONE), key
        assert row["pycnn_ms"] > 0 and row["gbps"] > 0 and row["gflops"] is None
    table = capsys.readouterr().out
    assert "pycnn ms" in table and "relu" in table and "maxpool2x2" in table


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
        (i, a) for i, case in enumerate(conv.bench) if case.where == "cpu" for a in ("direct", "winograd", "winograd4", "auto")}
    for op in ("maxpool2x2", "avgpool2x2", "relu", "swish"):
        assert {c.shape for c in full if c.op == op} == {case.shapes for case in registry.get(op).bench_cases("cpu")}
    assert {c.op for c in full if c.unfused} == {"conv3x3+relu", "batchnorm+relu"}
