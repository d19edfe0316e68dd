"""The C++ backend: the build of csrc/ that this CPU runs, under one name.

The extension is compiled once per instruction-set variant (pycnn._C_avx512, pycnn._C_avx2
on x86-64; pycnn._C_generic elsewhere).  Importing this module picks one (pycnn/_cpu.py:
the best the CPU has, or the one PYCNN_CPU names), imports it and takes over its
functions, so ``from pycnn import _C`` works as if ``_C`` were the binary itself.
``pycnn.cpu_info()`` says which one runs and why; _C.pyi describes the functions.

Raises ImportError where no variant can run here (callers fall back to the NumPy reference).
"""
import importlib as _importlib
import importlib.util as _util
import sys as _sys

from pycnn import _cpu


def _import_variant(choice):
    path = _cpu.variant_file(choice["variant"])
    if path is None:
        return _importlib.import_module(choice["module"])
    # PYCNN_EXTENSION_DIR: the binary from that folder, under the module's own name
    spec = _util.spec_from_file_location(choice["module"], path)
    module = _util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _sys.modules[choice["module"]] = module
    return module


def _load():
    choice = _cpu.choose()
    module = _import_variant(choice)
    names = {k: v for k, v in vars(module).items() if not (k.startswith("__") and k.endswith("__"))}
    globals().update(names)
    globals()["__doc__"] = module.__doc__
    _cpu._loaded = {**choice, "file": getattr(module, "__file__", None), "build": dict(module.build_info()),
                    "loaded": True}


_load()
del _load, _import_variant, _importlib, _util, _sys
