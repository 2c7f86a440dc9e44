"""The layers show in the folders: no import cycles, typer/rich only in cli/, grpc only in net/.

Every import statement counts, those inside functions too (a lazy import is still a dependency).
docs/architecture.md draws the same map.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tiality_cli"
UI = ("typer", "rich", "click", "shellingham")
WIRE = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "tiality_cli.net._proto")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "_pb2" not in p.name}


def imports(path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file; `from pkg import mod` names the submodule."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {i for i, _ in imports(p, known) if i in known and i != m} for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS with colours)."""
    colour = dict.fromkeys(edges, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(edges):
        if colour[root]:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
            elif colour.get(child, 2) == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(child) :], child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(edges[child]))))
    return None


def offenders(prefixes: tuple[str, ...], allowed: str) -> list[str]:
    found = []
    mods = modules()
    for name, path in sorted(mods.items()):
        if name == allowed or name.startswith(allowed + "."):
            continue
        for imported, line in imports(path, set(mods)):
            if any(imported == p or imported.startswith(p + ".") for p in prefixes):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    """The check below could pass on a broken finder: prove it sees a cycle, in functions too."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    lazy = ast.parse("def f():\n    from tiality_cli.io import listing\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(lazy))


def test_no_import_cycles() -> None:
    edges = graph()
    assert len(edges) > 30  # the walk saw the whole package
    assert "tiality_cli.io.sources" in edges["tiality_cli.cli.app"] or any(
        "tiality_cli.io" in e for e in edges["tiality_cli.cli.app"]
    )
    assert find_cycle(edges) is None


def test_typer_and_rich_only_in_cli() -> None:
    assert offenders(UI, "tiality_cli.cli") == []
    assert offenders(UI, "tiality_cli.nowhere")  # the check sees the CLI's own imports


def test_grpc_only_in_net() -> None:
    assert offenders(WIRE, "tiality_cli.net") == []
    assert offenders(WIRE, "tiality_cli.nowhere")  # the check sees the wire's own imports
