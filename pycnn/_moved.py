"""Old import paths of modules that moved when pycnn was split into core / data / training /
bench (issue 8): ``import pycnn.augment`` (and ``from pycnn import augment``) still give the
module, now ``pycnn.data.augment`` -- the same module object, so monkeypatching either name
patches both.  New code imports the new names."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "pycnn.datasets": "pycnn.data.datasets",
    "pycnn.augment": "pycnn.data.augment",
    "pycnn.preprocess": "pycnn.data.preprocess",
    "pycnn.config": "pycnn.training.config",
    "pycnn.trainer": "pycnn.training.trainer",
    "pycnn.train": "pycnn.training.runs",
    "pycnn.checks": "pycnn.training.checks",
    "pycnn.figures": "pycnn.training.figures",
    "pycnn.diagnostics": "pycnn.training.diagnostics",
    "pycnn.report": "pycnn.training.report",
    "pycnn.finetune": "pycnn.training.finetune",
    "pycnn.cli": "pycnn.training.cli",
    "pycnn.tools": "pycnn.training.tools",
    "pycnn.benchmarks": "pycnn.bench.harness",
    "pycnn.init": "pycnn.initializers",
}


def new_name(old: str) -> str | None:
    """The module's new name for an old one (``pycnn.tools.search`` included), else None."""
    for prefix, target in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # the target module ran when it was imported


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finder, which would load a second copy


def attribute(name: str):
    """``pycnn.<name>`` for an old module name (the package's ``__getattr__``)."""
    new = new_name(f"pycnn.{name}")
    if new is None:
        raise AttributeError(f"module 'pycnn' has no attribute {name!r}")
    return importlib.import_module(new)
