"""The C++ backend: the build of csrc/ that this CPU runs, under one name.

The extension is compiled once per instruction-set variant (pycnn._C_avx512, pycnn._C_avx2
on x86-64; pycnn._C_generic elsewhere).  Importing this module picks one (pycnn/_cpu.py:
the best the CPU has, or the one PYCNN_CPU names), imports it and takes over its
functions, so ``from pycnn import _C`` works as if ``_C`` were the binary itself.
``pycnn.cpu_info()`` says which one runs and why; _C.pyi describes the functions.

Raises ImportError where no variant can run here (callers fall back to the NumPy reference).
"""
from pycnn import _cpu


def _take_over(choice: dict) -> None:
    module = _cpu.import_variant(choice)
    names = {k: v for k, v in vars(module).items() if not (k.startswith("__") and k.endswith("__"))}
    globals().update(names)
    globals()["__doc__"] = module.__doc__
    _cpu._loaded = {**choice, "file": getattr(module, "__file__", None), "build": dict(module.build_info()),
                    "loaded": True}


_take_over(_cpu.choose())
del _take_over
