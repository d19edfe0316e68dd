"""Build script: the Python packages plus the C++ extension ``pycnn._C`` built by CMake.

Follows pybind11's "cmake_example": a ``CMakeExtension`` has no sources of its own, and
``CMakeBuild.build_extension`` configures and builds CMakeLists.txt so that the module lands
at ``self.get_ext_fullpath(ext.name)`` (the build directory, or the source tree for
``pip install -e .`` / ``--inplace``).

Environment variables:
  PYCNN_PORTABLE=1   build without -march=native (binaries for other machines)
  PYCNN_DEBUG=1      CMake Debug build
  CMAKE_ARGS         extra arguments for the CMake configure step
  CMAKE_GENERATOR    generator (default: Ninja when the ninja package or binary is found)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _ninja_args() -> list[str]:
    try:
        import ninja  # the PyPI package (a build requirement) ships the binary
        path = Path(ninja.BIN_DIR) / "ninja"
        return ["-GNinja", f"-DCMAKE_MAKE_PROGRAM:FILEPATH={path}"]
    except ImportError:
        path = shutil.which("ninja")
        return ["-GNinja", f"-DCMAKE_MAKE_PROGRAM:FILEPATH={path}"] if path else []


def _pybind11_dir() -> str:
    try:
        import pybind11
        return pybind11.get_cmake_dir()
    except ImportError:
        return subprocess.check_output([sys.executable, "-m", "pybind11", "--cmakedir"], text=True).strip()


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cfg = "Debug" if (_env_flag("PYCNN_DEBUG") or self.debug) else "Release"

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPYCNN_PORTABLE={'ON' if _env_flag('PYCNN_PORTABLE') else 'OFF'}",
        ]
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [item for item in os.environ["CMAKE_ARGS"].split() if item]
        if not os.environ.get("CMAKE_GENERATOR"):
            cmake_args += _ninja_args()

        build_args = ["--config", cfg]
        # use every core unless the caller chose (CMAKE_BUILD_PARALLEL_LEVEL or --parallel)
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else (os.cpu_count() or 1)
            build_args += [f"-j{jobs}"]

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)
        if not ext_fullpath.exists():
            raise RuntimeError(f"CMake did not produce {ext_fullpath}")


if not (ROOT / "kernels").is_dir():
    raise RuntimeError("kernels/ is missing: it is installed as the sub-package pycnn.kernels")

setup(
    packages=find_packages(include=["pycnn", "pycnn.*"]) + ["pycnn.kernels"],
    package_dir={"pycnn.kernels": "kernels"},
    package_data={"pycnn": ["py.typed", "*.pyi"]},
    ext_modules=[CMakeExtension("pycnn._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
