"""The package's imports point one way (CONTRIBUTING.md, "Architecture"): no circle, at module
level or inside functions, and the lower layers never reach up."""

import ast
from pathlib import Path

import pytest

from .cases import ROOT

PACKAGE = ROOT / "fused_act"
EXTENSIONS = {"fused_act._C"}  # the built CUDA extension: no source, imports nothing


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {_module(p): p for p in PACKAGE.rglob("*.py")}
    found.update({f"fused_act.triton_kernels.{p.stem}": p
                  for p in (ROOT / "triton_kernels").glob("*.py") if p.stem != "__init__"})
    return found


def imports() -> dict[str, set[str]]:
    """Each fused_act module's imports of other fused_act modules, wherever they are written
    (module level or inside a function: a lazy import closes a circle just the same)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # "from . import x" names a submodule where one exists, else the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names if f"{base}.{a.name}" not in EXTENSIONS]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_circle():
    graph = imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name):], name])
            pytest.fail(f"import circle: {cycle}")
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize(("lower", "never"), [
    # the op builder knows nothing of settings, DTensor or the families built on it
    ("fused_act.ops.op", ("fused_act.config", "fused_act.distributed", "fused_act.registry")),
    # the ops never reach DTensor support, the public API or the modules
    ("fused_act.ops", ("fused_act.distributed", "fused_act.functional", "fused_act.nn",
                       "fused_act")),
    # the activations' table and the math know nothing above them
    ("fused_act.registry", ("fused_act", "fused_act.functional", "fused_act.ops")),
    ("fused_act.reference", ("fused_act", "fused_act.registry", "fused_act.ops")),
    # the kernels import nothing of the host package
    ("fused_act.triton_kernels", ("fused_act", "fused_act.ops", "fused_act.plan")),
])
def test_lower_layers_do_not_reach_up(lower, never):
    graph = imports()
    for name, deps in graph.items():
        if name == lower or name.startswith(f"{lower}."):
            bad = sorted(d for d in deps if d in never or any(
                d.startswith(f"{n}.") for n in never if n != "fused_act"))
            assert not bad, f"{name} imports {bad}"


def test_every_package_ships():
    """The wheel lists its packages by name (pyproject.toml): a new folder of the package that
    is not listed installs in editable mode and is missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # python 3.11 on
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {_module(p) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
