"""The package's import graph: layers that depend one way, no cycles, and mathematics importable without
transformers (see ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dkm_hf"
# Lower layers never import higher ones. Modules of one layer may import each other (without cycles).
LAYERS = {
    "dkm_hf.errors": 0,
    "dkm_hf.ops": 1,
    "dkm_hf.nn": 2,
    "dkm_hf.config": 3,
    "dkm_hf.config_checks": 3,
    "dkm_hf.surgery": 4,
    "dkm_hf.integrations": 5,
    "dkm_hf.cli": 6,
    "dkm_hf.checkpoint": 7,  # deprecated re-exports
    "dkm_hf": 7,  # __init__: the public API
}
SIDE_BY_SIDE = ("dkm_hf.nn.dkm", "dkm_hf.nn.palettized")  # the two module families never import each other


def _modules() -> dict[str, Path]:
    root = PACKAGE.parent
    return {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")
    }


def _layer(module: str) -> int:
    best = max((key for key in LAYERS if module == key or module.startswith(key + ".")), key=len)
    return LAYERS[best]


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported dkm_hf module, imported inside a function) for every import of `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    modules = _modules()
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            if target.split(".")[0] == "dkm_hf" or target.split(".")[0] == "transformers":
                found.append((target, id(node) in nested))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {t for t, _ in _imports(name, path) if t in modules and t != name and t != "dkm_hf"}
        for name, path in modules.items()
    }


def test_no_upward_import():
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_no_import_cycle():
    graph, cycles, state = _graph(), [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_lazy_import_of_the_package():
    lazy = [
        f"{name} imports {t} inside a function"
        for name, p in _modules().items()
        for t, inner in _imports(name, p)
        if inner and t.startswith("dkm_hf")
    ]
    assert lazy == []


def test_the_two_module_families_do_not_import_each_other():
    graph = _graph()
    assert SIDE_BY_SIDE[1] not in graph[SIDE_BY_SIDE[0]] and SIDE_BY_SIDE[0] not in graph[SIDE_BY_SIDE[1]]


def test_mathematics_imports_no_transformers():
    offenders = [
        f"{name} imports {t}"
        for name, path in _modules().items()
        if _layer(name) <= 1
        for t, _ in _imports(name, path)
        if t.startswith("transformers")
    ]
    assert offenders == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_file_says_its_job_and_stays_short(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name} has no opening docstring"
    assert len(path.read_text().splitlines()) <= 400


def test_mathematics_runs_with_transformers_absent():
    code = f"""
import importlib.util, sys
sys.modules["transformers"] = None  # any import of transformers fails
spec = importlib.util.spec_from_file_location(
    "ops", {str(PACKAGE / "ops" / "__init__.py")!r}, submodule_search_locations=[{str(PACKAGE / "ops")!r}]
)
ops = importlib.util.module_from_spec(spec)
sys.modules["ops"] = ops
spec.loader.exec_module(ops)
import torch
from ops.dkm import dkm_cluster
from ops.kmeans import kmeans_init
from ops.packing import pack_indices, unpack_indices
w = torch.randn(1, 500, 1, requires_grad=True)
soft, c = dkm_cluster(w, kmeans_init(w, 4), 1e-2, 3, 1e-4, "uniquified")
soft.sum().backward()
idx = torch.randint(0, 8, (13,))
assert torch.equal(unpack_indices(pack_indices(idx, 3), 3, 13), idx)
print("ok", "transformers" in sys.modules and sys.modules["transformers"] is None)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "True"], proc.stderr[-2000:]
