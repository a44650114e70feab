"""The shared Hugging Face core (`prefloss.hf.core`): the import graph of prefloss's modules has no cycle,
and `prefloss.trl` builds on the core, never on `PreferenceTrainer`'s module.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a → b`` for every
``import b`` / ``from b import name`` / ``from pkg import b`` in module ``a``, at module level or inside
a function. The packages a module lives in, which Python runs first, are not edges.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import prefloss

ROOT = Path(prefloss.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The prefloss modules one import statement of ``module`` depends on: ``from pkg import sub`` on
    the submodule ``pkg.sub``, ``from pkg import name`` on ``pkg`` itself (its ``__init__`` defines
    ``name``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """``{module: the prefloss modules it imports}`` for every module of the prefloss package."""
    paths = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = {
            target
            for node in ast.walk(tree)
            for target in _imported(node, module, is_package, set(paths))
            if target in paths and target != module
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "prefloss.hf.core" in graph["prefloss.trl.dpo"]
    assert "prefloss.hf.heads" in graph["prefloss.hf.adapters"]  # imported inside functions only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_prefloss_modules() -> None:
    assert cycles(import_graph()) == []


def test_trl_never_imports_the_preference_trainer_module() -> None:
    graph = import_graph()
    trl_modules = [m for m in graph if m == "prefloss.trl" or m.startswith("prefloss.trl.")]
    assert len(trl_modules) >= 4
    for module in trl_modules:
        assert "prefloss.hf.trainer" not in reachable(graph, module), module
        assert "prefloss.hf" not in graph[module], f"{module} imports the whole prefloss.hf package"
    for module in ("prefloss.trl.dpo", "prefloss.trl.cpo"):
        assert "prefloss.hf.core" in graph[module]
    assert "prefloss.hf.core" in graph["prefloss.hf.trainer"]


@pytest.mark.parametrize("package", ["prefloss.hf", "prefloss.trl"])
def test_public_names_import(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if package == "prefloss.trl":
        pytest.importorskip("trl")
        monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # CPOTrainer comes from trl.experimental
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
