"""The layout holds: kernels/ is a leaf, pycnn has no import cycles at module level, the old
module paths still give the moved modules (the same objects), and the core imports neither
the data nor the training layer."""
from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

from pycnn import _moved

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


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_module_paths_give_the_moved_modules(old):
    assert importlib.import_module(old) is importlib.import_module(_moved.MOVED[old])


def test_old_names_as_attributes_and_submodules():
    import pycnn
    from pycnn import augment  # noqa: F401 (the old spelling)
    from pycnn.data import augment as new
    assert pycnn.augment is new
    assert importlib.import_module("pycnn.tools.search") is importlib.import_module("pycnn.training.tools.search")
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        pycnn.not_a_module  # noqa: B018
