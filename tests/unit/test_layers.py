"""The packages form layers that only point down, data ← model ← train ← eval ← bench, without import cycles.

Every import counts, at module level or inside a function (a function-level import does not make a cycle go
away, it only moves the failure to run time), read from the source with `ast`, so the test needs nothing
imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("data", "model", "train", "eval", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports}, e.g. {"train.dpo": {"model.losses", "data.preference", ...}}."""
    files = {module_name(p): p for layer in LAYERS for p in (REPO / layer).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                # the longest prefix that is a project module: "model.losses.dpo_loss" → "model.losses"
                found = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in files), None)
                if found and found != mod:
                    targets.add(found)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_only_point_down_a_layer():
    graph = project_imports()
    assert {"train.dpo", "model.losses", "data.preference", "eval.passkey"} <= graph.keys()
    assert "model.losses" in graph["train.dpo"]  # the walk sees imports
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                    if rank[t.split(".")[0]] > rank[m.split(".")[0]])
    assert not upward, "imports pointing up a layer (data ← model ← train ← eval ← bench):\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = project_imports()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector works
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in found)
