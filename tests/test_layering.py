"""The package's import directions, as the architecture draws them (read from the source, nothing run).

Why: train/model/data must stay usable without Optuna and without the driver, and most imports here are
made inside functions (to keep commands quick to start), where a reviewer does not look for them. This
walk sees every import statement, at any depth of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "search"

# module -> what it must never import (search's own modules by their short name, or a package's root)
FORBIDDEN = {
    "train": {"optuna", "study", "worker", "cli", "space", "storage", "states", "export", "vote", "rich"},
    "model": {"optuna", "study", "worker", "cli", "data", "train", "infer"},
    "data": {"optuna", "study", "worker", "cli", "train", "model", "space"},
    "layout": {"optuna", "study", "worker", "cli", "train", "model", "space", "data"},
    "config": {"optuna", "torch", "study", "worker", "cli"},
    "infer": {"optuna", "study", "worker", "cli", "train"},
    "vote": {"optuna", "study", "worker", "cli", "export"},
    "manifest": {"torch", "optuna"},  # export/vote check their input before torch is imported
    "submission": {"torch", "optuna"},
}


def _imports(module: str, top_level_only: bool = False) -> set[str]:
    """Every module ``module`` imports: search's own by their short name, others by their root."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("search." if node.level else "") + (node.module or "")
            base = base.rstrip(".")
            names = [f"{base}.{alias.name}" for alias in node.names] if base == "search" else [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.add(parts[1] if parts[0] == "search" and len(parts) > 1 else parts[0])
    return found


def test_the_core_modules_import_nothing_above_them() -> None:
    broken = {m: sorted(_imports(m) & banned) for m, banned in FORBIDDEN.items() if _imports(m) & banned}
    assert not broken, broken


def test_no_two_modules_import_each_other_even_through_others() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: _imports(m) & modules for m in modules}
    state: dict[str, str] = {}  # "open" while its imports are being walked, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", " -> ".join([*path, module, other])
            if other not in state:
                visit(other, [*path, module])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])


def test_the_launcher_imports_only_what_python_has_loaded_already() -> None:
    """search.launch guards the command line's loading; anything it imports at its top is unguarded."""
    assert _imports("launch", top_level_only=True) <= {"__future__", "sys"}
