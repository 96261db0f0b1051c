"""The layout shows the architecture: atlas/ has no torch, and no module imports itself back.

Imports inside functions count too: a function-local import hides a cycle without removing it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("atlas", "workers", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, anywhere in its body (`from pkg import submodule`
    counts as the submodule)."""
    out: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            names = subs if all(s in known for s in subs) else [base, *subs]
        else:
            continue
        out |= {n for n in names if n in known and n != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert _cycles(graph) == []


def test_the_database_side_never_imports_a_model_library() -> None:
    """atlas/ (the database and the service) runs without torch: no torch, transformers, ray or workers."""
    for path in (ROOT / "atlas").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in {"torch", "transformers", "ray", "workers", "cli"}, \
                        f"{path.relative_to(ROOT)} imports {name}"


def test_family_helpers_live_in_their_family_package() -> None:
    """workers/ holds shared infrastructure only; a family's own helpers sit in its package."""
    flat = {p.stem for p in (ROOT / "workers").glob("*.py")}
    for helper in ("ablation_exact", "atp", "ioi", "somp", "editing", "needles", "decode_probe", "lens_training"):
        assert helper not in flat
    for family in ("ablation", "pursuit", "retrieval", "lens"):
        assert (ROOT / "workers" / "families" / family / "__init__.py").exists()
