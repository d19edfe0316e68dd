"""The layout holds: kernels/ is a leaf, pycnn has no import cycles at module level, imports
inside functions are few and named, the core imports neither the data nor the training
layer, and no file outgrows its budget."""
from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["pycnn"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources():
    return sorted(REPO.glob("pycnn/**/*.py")) + sorted(REPO.glob("kernels/*.py"))


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """Modules imported at module level (imports inside functions run on demand)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            submodules = {f"{module}.{alias.name}" for alias in node.names}
            found.update(submodules)
            if not submodules <= _MODULES:  # `from package import submodule` runs the package
                found.add(module)            # first, but that is no import of it by the package
    return found


_MODULES = {_module_name(p) for p in _sources()}


def _graph() -> dict[str, set[str]]:
    names = {_module_name(p): p for p in _sources()}
    return {name: {m for m in _top_level_imports(path) if m in names and m != name}
            for name, path in names.items()}


def test_kernels_import_nothing_from_pycnn():
    for path in sorted(REPO.glob("kernels/*.py")):
        imported = _top_level_imports(path)
        text = path.read_text()
        outside = [m for m in imported if m.startswith("pycnn") and not m.startswith("pycnn.kernels")]
        assert not outside, f"{path.name} imports {outside}"
        assert "from pycnn" not in text and "import pycnn" not in text, f"{path.name} imports pycnn"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("layer", ["pycnn.data", "pycnn.training", "pycnn.bench"])
def test_core_does_not_import_upper_layers(layer):
    core = [p for p in _sources() if _module_name(p).split(".")[1:2] not in (["data"], ["training"], ["bench"])
            and not _module_name(p).startswith("pycnn.kernels") and p.name != "__main__.py"]  # __main__: the CLI
    for path in core:
        bad = [m for m in _top_level_imports(path) if m == layer or m.startswith(layer + ".")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad} at module level"


# Imports of pycnn modules inside functions: each one loads an optional dependency or a backend
# lazily (numba/CuPy for CUDA, the compiled extension, Ray, matplotlib, torch), or keeps the
# command line quick to start; anything else belongs at module level.
FUNCTION_LEVEL_BUDGET = 25


def _function_level_imports() -> list[str]:
    found = []
    for path in _sources():
        if not _module_name(path).startswith("pycnn") or path.parts[-2] == "kernels":
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pycnn") \
                    or isinstance(node, ast.Import) and any(a.name.startswith("pycnn") for a in node.names):
                if id(node) not in top:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_few_function_level_imports_of_pycnn_modules():
    found = _function_level_imports()
    assert len(found) <= FUNCTION_LEVEL_BUDGET, f"{len(found)} imports of pycnn modules inside functions:\n" + \
        "\n".join(found)


def test_files_within_their_line_budget():
    long_files = [f"{p.relative_to(REPO)}: {n}" for p in _sources() if (n := len(p.read_text().splitlines())) > 500]
    long_files += [f"{p.relative_to(REPO)}: {n}" for p in sorted(REPO.glob("csrc/*"))
                   if (n := len(p.read_text().splitlines())) > 550]
    assert not long_files, "files over budget (Python 500 lines, C++ 550): " + ", ".join(long_files)


def test_ruff_check_is_clean():
    """The lint rules of pyproject.toml ([tool.ruff]) hold over the whole tree."""
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (it comes with the test extra)")
    done = subprocess.run([ruff, "check", "--no-cache", "--quiet", str(REPO)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
