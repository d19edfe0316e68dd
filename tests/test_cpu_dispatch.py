"""The C++ backend's builds per instruction set (pycnn/_cpu.py, pycnn/_C.py, CMakeLists.txt):
the choice at import, PYCNN_CPU, cpu_info(), every runnable variant computing the same
results, and the C++ tests passing on the baseline variant (PYCNN_CPU=baseline) in a
child process, whatever this process runs."""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pycnn
from pycnn import _cpu

ROOT = Path(__file__).resolve().parents[1]


def _supported(name: str) -> bool:
    features, _ = _cpu.cpu_features()
    return all(features.get(f, False) for f in _cpu.VARIANTS[name][1])


def runnable_variants() -> list[str]:
    """The built variants this CPU can run, best first."""
    return [name for name in _cpu.built_variants() if _supported(name)]


def _skip_without_extension():
    if not _cpu.built_variants():
        pytest.skip("the C++ extension is not built (source checkout without an install)")
    if not runnable_variants():
        pytest.skip(f"this CPU runs none of the built variants {_cpu.built_variants()}")


# ------------------------------------------------------------------------------ the choice

def test_the_extension_loads_and_cpu_info_says_which_variant():
    _skip_without_extension()
    from pycnn import _C  # an ImportError here would skip every C++ test of the suite: fail instead

    info = _cpu.cpu_info()
    assert info["loaded"] is True
    assert info["variant"] in _cpu.VARIANTS and info["module"] == _cpu.VARIANTS[info["variant"]][0]
    assert info["build"]["variant"] == info["variant"]  # what the binary says it was compiled for
    assert Path(info["file"]).is_file() and Path(info["file"]).name.startswith(f"_C_{info['variant']}.")
    assert info["reason"]
    assert _C.build_info()["variant"] == info["variant"]
    assert callable(_C.conv3x3_forward) and _C.num_threads() >= 1


def test_cpu_info_is_exported():
    assert pycnn.cpu_info is _cpu.cpu_info and "cpu_info" in pycnn.__all__
    info = pycnn.cpu_info()
    assert {"variant", "requested", "built", "cpu_features", "loaded"} <= set(info)


def test_auto_runs_the_best_variant_the_cpu_has(monkeypatch):
    _skip_without_extension()
    wanted = os.environ.get(_cpu.ENV, "").strip().lower()  # what this process was started with
    monkeypatch.delenv(_cpu.ENV, raising=False)
    choice = _cpu.choose()
    assert choice["variant"] == runnable_variants()[0]
    loaded = _cpu.cpu_info()
    if wanted in ("", "auto"):
        assert loaded["variant"] == choice["variant"]
    elif wanted == "baseline":
        assert loaded["variant"] == _cpu.baseline() and loaded["reason"] == f"{_cpu.ENV}=baseline"
    else:
        assert loaded["variant"] == wanted


def _fake_cpu(monkeypatch, has: set[str]):
    every = {f for _, feats in _cpu.VARIANTS.values() for f in feats}
    monkeypatch.setattr(_cpu, "cpu_features", lambda: ({f: f in has for f in every}, "test"))
    monkeypatch.setattr(_cpu, "built_variants", lambda: ["avx512", "avx2"])
    monkeypatch.setattr(_cpu, "is_x86", lambda: True)


def test_choice_on_cpus_with_and_without_avx512(monkeypatch):
    monkeypatch.delenv(_cpu.ENV, raising=False)
    _fake_cpu(monkeypatch, {"AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX2", "FMA3"})
    assert _cpu.choose()["variant"] == "avx512"
    # AVX512F without BW (Knights Landing): the AVX-512 build uses BW instructions, so not it
    _fake_cpu(monkeypatch, {"AVX512F", "AVX512DQ", "AVX512VL", "AVX2", "FMA3"})
    choice = _cpu.choose()
    assert choice["variant"] == "avx2" and "AVX512BW" in choice["reason"]
    _fake_cpu(monkeypatch, {"AVX2", "FMA3"})
    assert _cpu.choose()["variant"] == "avx2"
    _fake_cpu(monkeypatch, {"AVX2"})  # no FMA: nothing built runs (never an illegal instruction)
    with pytest.raises(ImportError, match="FMA3"):
        _cpu.choose()


def test_pycnn_cpu_forces_a_variant_or_refuses(monkeypatch):
    _fake_cpu(monkeypatch, {"AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX2", "FMA3"})
    monkeypatch.setenv(_cpu.ENV, "baseline")
    assert _cpu.choose()["variant"] == "avx2" and _cpu.choose()["reason"] == "PYCNN_CPU=baseline"
    monkeypatch.setenv(_cpu.ENV, "AVX512")
    assert _cpu.choose()["variant"] == "avx512"
    monkeypatch.setenv(_cpu.ENV, "auto")
    assert _cpu.choose()["variant"] == "avx512"
    monkeypatch.setenv(_cpu.ENV, "sse2")
    with pytest.raises(ImportError, match="PYCNN_CPU must be"):
        _cpu.choose()
    monkeypatch.setenv(_cpu.ENV, "generic")  # a variant that is not built here
    with pytest.raises(ImportError, match="not built"):
        _cpu.choose()
    _fake_cpu(monkeypatch, {"AVX2", "FMA3"})
    monkeypatch.setenv(_cpu.ENV, "avx512")  # forced, but the CPU lacks it: refused, not loaded
    with pytest.raises(ImportError, match="lacks AVX512F"):
        _cpu.choose()


def test_cpu_features_agree_with_proc_cpuinfo():
    path = Path("/proc/cpuinfo")
    if not path.is_file() or not _cpu.is_x86():
        pytest.skip("needs Linux on x86-64")
    flags = set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    features, source = _cpu.cpu_features()
    assert source.startswith("numpy")
    for name, flag in _cpu._PROC_FLAGS.items():
        if features[name]:  # numpy also asks the OS (XSAVE), so it may say less, never more
            assert flag in flags, name


# ------------------------------------------------------------------ every variant, same results

def _variant_module(name):
    if _cpu.extension_dir():
        pytest.skip("PYCNN_EXTENSION_DIR (.ci/sanitize.sh): only the chosen variant is loaded from there")
    return importlib.import_module(_cpu.VARIANTS[name][0])


@pytest.mark.parametrize("name", list(_cpu.VARIANTS))
def test_each_runnable_variant_says_what_it_was_built_for(name):
    if name not in runnable_variants():
        pytest.skip(f"{name} is not built here or this CPU can't run it")
    mod = _variant_module(name)
    info = mod.build_info()
    assert info["variant"] == name
    wanted = {"avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"},
              "avx2": {"avx2", "fma"}, "generic": set()}[name]
    assert wanted <= set(info["isa"])
    if name == "avx2":
        assert not any(isa.startswith("avx512") for isa in info["isa"])
    peak = mod.fma_peak_gflops(200_000)
    assert (math.isnan(peak) if name == "generic" else peak > 0)


def _outputs(mod, rng_seed=0):
    """Outputs of the hot kernels of one variant on fixed inputs (float32)."""
    rng = np.random.default_rng(rng_seed)
    out = {}
    for shape in [(2, 3, 7, 9), (2, 16, 12, 12), (1, 20, 5, 17), (3, 4, 16, 16)]:
        n, c, h, w = shape
        k = 7
        x = rng.standard_normal(shape).astype(np.float32)
        wt = (rng.standard_normal((k, c, 3, 3)) * 0.3).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        gy = rng.standard_normal((n, k, h, w)).astype(np.float32)
        for algo in ("direct", "winograd"):
            y = np.full((n, k, h, w), np.nan, np.float32)
            mod.conv3x3_forward(x, wt, b, y, algo)
            gx, gw, gb = np.full_like(x, np.nan), np.full_like(wt, np.nan), np.full_like(b, np.nan)
            mod.conv3x3_grad_x(gy, wt, gx, algo)
            mod.conv3x3_grad_weight(x, gy, gw, gb, algo)
            out[f"conv {shape} {algo}"] = (y, gx, gw, gb)
            ya = np.full((n, k, h, w), np.nan, np.float32)
            mod.conv3x3_act_forward(x, wt, b, None, ya, None, "elu", 0.01, 1.0, algo)
            out[f"conv_elu {shape} {algo}"] = (ya,)
        if h % 2 == 0 and w % 2 == 0:
            yp = np.full((n, c, h // 2, w // 2), np.nan, np.float32)
            arg = np.zeros(yp.shape, np.uint8)
            mod.maxpool2x2_forward(x, yp, arg)
            out[f"maxpool {shape}"] = (yp, arg)
    z = np.concatenate([np.linspace(-30, 30, 10_007), rng.standard_normal(999) * 5]).astype(np.float32)
    for name in ("sigmoid", "tanh", "elu"):
        y = np.full_like(z, np.nan)
        getattr(mod, f"{name}_forward")(z, y)
        g = np.full_like(z, np.nan)
        getattr(mod, f"{name}_backward")(z, np.ones_like(z), g)
        out[name] = (y, g)
    return out


def test_every_runnable_variant_computes_the_same_results():
    _skip_without_extension()
    names = runnable_variants()
    if len(names) < 2:
        pytest.skip(f"one runnable variant here ({names})")
    results = {name: _outputs(_variant_module(name)) for name in names}
    first = results[names[0]]
    for name in names[1:]:
        for key, arrays in results[name].items():
            for got, want in zip(arrays, first[key]):
                assert not np.isnan(got.astype(np.float64)).any(), f"{name} {key}: an output left unwritten"
                if got.dtype == np.uint8:  # max-pool winners: exact
                    np.testing.assert_array_equal(got, want, err_msg=f"{name} vs {names[0]}: {key}")
                else:  # sums in another order (vector width, blocking): float32 rounding only
                    scale = max(1.0, float(np.abs(want).max()))
                    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale,
                                               err_msg=f"{name} vs {names[0]}: {key}")


# ------------------------------------------------------------------------- the baseline path

def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    env.update(extra)
    return env


def test_pycnn_cpu_baseline_loads_the_baseline_in_a_fresh_process():
    _skip_without_extension()
    code = "import json, pycnn._C, pycnn._cpu as c; print(json.dumps(c.cpu_info()))"
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(PYCNN_CPU="baseline"), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["loaded"] and info["variant"] == _cpu.baseline() and info["reason"] == "PYCNN_CPU=baseline"
    bad = subprocess.run([sys.executable, "-c", "import pycnn._C"], env=_child_env(PYCNN_CPU="pentium"), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "PYCNN_CPU must be" in bad.stderr


# A representative subset of the C++ kernel tests (conv direct / Winograd / fused, pooling,
# the vectorised exp of sigmoid / tanh / elu, batch norm), ~30 s on the baseline build.
BASELINE_SUBSET = ["tests/test_cpp_conv.py", "tests/test_cpp_maps.py", "tests/test_cpp_batchnorm.py",
                   "tests/test_conv_act.py"]


def test_cpp_tests_pass_on_the_baseline_variant():
    _skip_without_extension()
    if _cpu.cpu_info()["variant"] == _cpu.baseline():
        pytest.skip("this process already runs the baseline variant (the whole suite tests it)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *BASELINE_SUBSET]
    out = subprocess.run(cmd, env=_child_env(PYCNN_CPU="baseline"), cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    tail = "\n".join(out.stdout.splitlines()[-25:]) + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1]) if " passed" in summary else 0
    assert passed >= 100, tail  # not a run whose modules skipped for want of pycnn._C


# --------------------------------------------------------------------------------- the version

def test_the_installed_version_is_the_one_in_pycnn_init():
    try:
        installed = importlib.metadata.version("pycnn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pycnn is not installed (source checkout)")
    assert installed == pycnn.__version__
    text = (Path(pycnn.__file__).parent / "__init__.py").read_text()
    assert text.count("__version__ =") == 1


def test_the_stub_lists_what_the_extension_has():
    """_C.pyi names every public function of pycnn._C and nothing else (pycnn/_C.py adds none)."""
    _skip_without_extension()
    import re

    from pycnn import _C

    stub = (Path(pycnn.__file__).parent / "_C.pyi").read_text()
    assert set(re.findall(r"^def (\w+)", stub, re.M)) == {n for n in dir(_C) if not n.startswith("_")}
