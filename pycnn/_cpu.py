"""Which build of the C++ backend this CPU runs: the table of variants and the choice.

The extension is built once per instruction-set variant (CMakeLists.txt); each row of
``VARIANTS`` names a module and the CPU features it assumes, best first, like NNPACK's hwinfo
table.  The one list: CMakeLists.txt compiles each variant with the flags of its features
(``python -I pycnn/_cpu.py --flags avx512`` prints them, ``FLAGS``; -I keeps pycnn/random.py
from shadowing the standard module), and ``pycnn._C`` imports the
first variant that is built and whose features the CPU (and the operating system) has:

    avx512   pycnn._C_avx512   AVX512F AVX512BW AVX512DQ AVX512VL AVX2 FMA3
    avx2     pycnn._C_avx2     AVX2 FMA3            the x86-64 baseline
    generic  pycnn._C_generic  nothing              other architectures (aarch64 ...)

The environment variable ``PYCNN_CPU`` (read when ``pycnn._C`` is first imported) overrides
the choice: ``baseline`` (the x86-64 baseline, or generic elsewhere: for testing the paths
without AVX-512), or a variant's name; ``auto`` or unset chooses.  A variant the CPU cannot
run is refused with ImportError, never loaded (it would die on an illegal instruction).

The CPU's features come from NumPy (``__cpu_features__``: CPUID plus the operating system's
XSAVE support, the same test NumPy's own dispatch uses), else from /proc/cpuinfo.

``PYCNN_EXTENSION_DIR`` names a folder to load the variants from instead of the package
(.ci/sanitize.sh runs the tests on a sanitizer build that way, beside the normal install).

``cpu_info()`` (exported as ``pycnn.cpu_info``) says which variant runs and why.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import sys

ENV = "PYCNN_CPU"
DIR_ENV = "PYCNN_EXTENSION_DIR"

# name -> (module, features the compiler flags of the variant assume), best first.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "avx512": ("pycnn._C_avx512", ("AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX2", "FMA3")),
    "avx2": ("pycnn._C_avx2", ("AVX2", "FMA3")),
    "generic": ("pycnn._C_generic", ()),
}
_X86 = ("x86_64", "amd64", "x64", "i686", "i386")
# /proc/cpuinfo flag of each NumPy feature name (Linux).
_PROC_FLAGS = {"AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
               "AVX2": "avx2", "FMA3": "fma"}
# The compiler flag (gcc, clang) that lets the compiler use each feature.
FLAGS = {"AVX512F": "-mavx512f", "AVX512BW": "-mavx512bw", "AVX512DQ": "-mavx512dq", "AVX512VL": "-mavx512vl",
         "AVX2": "-mavx2", "FMA3": "-mfma"}

_loaded: dict | None = None  # set by pycnn._C once it has imported a variant


def is_x86() -> bool:
    return platform.machine().lower() in _X86


def baseline() -> str:
    """The variant every CPU of this architecture runs (PYCNN_CPU=baseline)."""
    return "avx2" if is_x86() else "generic"


def cpu_features() -> tuple[dict[str, bool], str]:
    """The features of VARIANTS' rows that this CPU has, and where that was read."""
    names = sorted({f for _, feats in VARIANTS.values() for f in feats})
    table = None
    for mod in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            table = importlib.import_module(mod).__cpu_features__
            source = f"numpy ({mod}.__cpu_features__)"
            break
        except (ImportError, AttributeError):
            continue
    if table is not None and all(n in table for n in names):
        return {n: bool(table[n]) for n in names}, source
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {n: _PROC_FLAGS[n] in flags for n in names}, "/proc/cpuinfo"


def extension_dir() -> str | None:
    """The folder named by PYCNN_EXTENSION_DIR, or None (the variants are in the package)."""
    folder = os.environ.get(DIR_ENV, "").strip()
    if folder and not os.path.isdir(folder):
        raise ImportError(f"environment variable {DIR_ENV}={folder!r} is not a folder")
    return folder or None


def variant_file(name: str) -> str | None:
    """The binary of variant ``name`` in PYCNN_EXTENSION_DIR, or None."""
    folder = extension_dir()
    if folder is None:
        return None
    stem = VARIANTS[name][0].rpartition(".")[2]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, stem + suffix)
        if os.path.isfile(path):
            return path
    return None


def built_variants() -> list[str]:
    """The variants whose module is installed (or in PYCNN_EXTENSION_DIR), best first."""
    out = []
    for name, (module, _) in VARIANTS.items():
        if extension_dir() is not None:
            if variant_file(name):
                out.append(name)
            continue
        try:
            if importlib.util.find_spec(module) is not None:
                out.append(name)
        except (ImportError, ValueError):
            pass
    return out


def requested() -> str:
    """PYCNN_CPU as a variant name, 'auto' when unset (ImportError for a value it can't be)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value == "baseline":
        return baseline()
    if value != "auto" and value not in VARIANTS:
        raise ImportError(f"environment variable {ENV} must be 'auto', 'baseline' or one of {sorted(VARIANTS)}, "
                          f"got {os.environ[ENV]!r}")
    return value


def choose() -> dict:
    """The variant to import: a dict with 'variant', 'module', 'reason' and what it was read from.
    Raises ImportError where none can run (none built, the forced one missing or unsupported)."""
    request = requested()
    features, source = cpu_features()
    built = built_variants()
    info = {"requested": os.environ.get(ENV, "").strip() or "auto", "built": built,
            "cpu_features": features, "features_from": source, "machine": platform.machine()}

    def missing(name: str) -> list[str]:
        return [f for f in VARIANTS[name][1] if not features.get(f, False)]

    if request != "auto":
        if request not in built:
            raise ImportError(f"{ENV}={info['requested']}: the variant {request!r} ({VARIANTS[request][0]}) "
                              f"is not built here (built: {built or 'none'})")
        if missing(request):
            raise ImportError(f"{ENV}={info['requested']}: this CPU lacks {', '.join(missing(request))}, "
                              f"which the variant {request!r} needs (features from {source})")
        reason = f"{ENV}={info['requested']}"
        return {**info, "variant": request, "module": VARIANTS[request][0], "reason": reason}
    skipped = []
    for name in built:
        lacks = missing(name)
        if not lacks:
            feats = VARIANTS[name][1]
            reason = (f"the CPU has {', '.join(feats)}" if feats else "no CPU features needed")
            if skipped:
                reason += f"; skipped {'; '.join(skipped)}"
            return {**info, "variant": name, "module": VARIANTS[name][0], "reason": reason}
        skipped.append(f"{name} (lacks {', '.join(lacks)})")
    if not built:
        raise ImportError("no variant of the C++ extension is built (pycnn._C_avx512 / _C_avx2 / _C_generic); "
                          "reinstall with `pip install .`")
    raise ImportError(f"this CPU runs none of the built variants of the C++ extension: {'; '.join(skipped)}")


def import_variant(choice: dict):
    """The module of ``choice`` (choose()): imported from the package, or from
    PYCNN_EXTENSION_DIR under the module's own name."""
    path = variant_file(choice["variant"])
    if path is None:
        return importlib.import_module(choice["module"])
    spec = importlib.util.spec_from_file_location(choice["module"], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[choice["module"]] = module
    return module


def cpu_info() -> dict:
    """Which build of the C++ backend runs and why.

    Keys: 'variant' ('avx512', 'avx2' or 'generic'), 'module', 'file' (the binary), 'reason',
    'requested' (PYCNN_CPU or 'auto'), 'built' (the variants installed), 'cpu_features'
    (what the CPU has of what the variants need) and 'features_from', 'machine', 'build'
    (what the binary says it was compiled for), and 'loaded' (False: pycnn._C is not
    imported yet, this is what it would choose; 'error' says why where it could not)."""
    if _loaded is not None:
        return dict(_loaded)
    try:
        return {**choose(), "loaded": False}
    except ImportError as exc:
        features, source = cpu_features()
        try:
            built = built_variants()
        except ImportError:
            built = []
        return {"variant": None, "module": None, "loaded": False, "error": str(exc),
                "requested": os.environ.get(ENV, "").strip() or "auto", "built": built,
                "cpu_features": features, "features_from": source, "machine": platform.machine()}


def compiler_flags(variant: str) -> list[str]:
    """The flags CMakeLists.txt compiles ``variant`` with: those of the features it assumes."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    return [FLAGS[f] for f in VARIANTS[variant][1]]


def main(argv: list[str] | None = None) -> int:
    """``python pycnn/_cpu.py --flags VARIANT``: the compiler flags of a variant, for CMake;
    without arguments: cpu_info() of this machine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--flags", metavar="VARIANT", help="print the compiler flags of VARIANT")
    args = parser.parse_args(argv)
    if args.flags is None:
        for key, value in cpu_info().items():
            print(f"{key}: {value}")
        return 0
    try:
        print(" ".join(compiler_flags(args.flags)))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
