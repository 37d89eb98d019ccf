"""The import graph between wiregate's packages: allowed edges only, no cycles.

Every ``import`` in the product's source is read (at module level and inside
functions; ``if TYPE_CHECKING:`` blocks are annotations, not imports). Each
package may import only what :data:`ALLOWED` lists; the CLI may reach every
process, but only lazily (inside the command that starts it), so its module
level imports the shared core alone. Inside each package, modules import each
other without cycles.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("wiregate", "agent", "gateway", "identity", "relay")

# node -> the nodes it may import (besides itself). "wiregate.cli" is its own node.
ALLOWED: Mapping[str, frozenset[str]] = {
    "wiregate": frozenset(),
    "identity": frozenset({"wiregate"}),
    "relay": frozenset({"wiregate"}),
    "agent": frozenset({"wiregate", "relay"}),
    "gateway": frozenset({"wiregate", "identity", "relay"}),
    "wiregate.cli": frozenset({"wiregate", "agent", "gateway", "identity", "relay"}),
}
# What the CLI may import at module level: the shared core only.
CLI_TOP_LEVEL = frozenset({"wiregate", "wiregate.cli"})
# What starting the agent must never load.
AGENT_NEVER = ("sqlalchemy", "alembic", "asyncpg", "jinja2", "gateway", "identity", "relay.aio")


def node_of(module: str) -> str | None:
    """The graph node a dotted module name belongs to (None: not wiregate's)."""
    if module == "wiregate.cli" or module.startswith("wiregate.cli."):
        return "wiregate.cli"
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool) -> Iterator[tuple[str, bool]]:
    """(imported module, at module level?) for every runtime import in ``source``."""

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                yield from (i for stmt in child.orelse for i in walk(stmt, top))
                continue
            if isinstance(child, ast.Import):
                yield from ((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                yield base, top
                # "from pkg import submodule" imports pkg.submodule too
                yield from ((f"{base}.{alias.name}", top) for alias in child.names)
            inner = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            yield from walk(child, inner)

    yield from walk(ast.parse(source), True)


def product_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
    }


def edges(modules: Mapping[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, at module level) between wiregate's own modules."""
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for target, top in imports_of(path.read_text(), module, is_package):
            while target and target not in modules:  # "a.b.Name" -> "a.b"
                target = target.rpartition(".")[0]
            if target and target != module:
                found.append((module, target, top))
    return found


def violations(found: list[tuple[str, str, bool]]) -> list[str]:
    """Every edge the rules refuse, as ``importer -> imported (why)``."""
    bad = []
    for source, target, top in found:
        a, b = node_of(source), node_of(target)
        if a is None or b is None or a == b:
            continue
        if b not in ALLOWED[a]:
            bad.append(f"{source} -> {target} ({a} may not import {b})")
        elif a == "wiregate.cli" and top and b not in CLI_TOP_LEVEL:
            bad.append(f"{source} -> {target} (the CLI imports {b} only inside a command)")
    return bad


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(found: list[tuple[str, str, bool]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for source, target, _top in found:
        a, b = node_of(source), node_of(target)
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)
    return graph


def module_graph(found: list[tuple[str, str, bool]]) -> dict[str, set[str]]:
    """Module-level imports only: the ones that run when a module is loaded."""
    graph: dict[str, set[str]] = {}
    for source, target, top in found:
        if top and not target.startswith(f"{source}."):  # a package loading its submodule
            graph.setdefault(source, set()).add(target)
    return graph


FOUND = edges(product_modules())


def test_every_import_between_packages_is_allowed() -> None:
    assert violations(FOUND) == []


def test_the_packages_import_each_other_without_cycles() -> None:
    assert cycles(package_graph(FOUND)) == []


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(module_graph(FOUND)) == []


def test_the_rules_catch_a_forbidden_edge_and_a_cycle() -> None:
    planted = [
        *FOUND,
        ("wiregate.errors", "agent.daemon", True),
        ("agent.daemon", "gateway.app", False),
        ("wiregate.cli.main", "gateway.app", True),
    ]
    assert violations(planted) == [
        "wiregate.errors -> agent.daemon (wiregate may not import agent)",
        "agent.daemon -> gateway.app (agent may not import gateway)",
        "wiregate.cli.main -> gateway.app (the CLI imports gateway only inside a command)",
    ]
    assert cycles(package_graph(planted)) == [["agent", "gateway", "identity", "relay", "wiregate"]]
    looped = module_graph([*FOUND, ("wiregate.errors", "wiregate.keys", True)])
    assert cycles(looped) == [["wiregate.errors", "wiregate.keys"]]


def test_relative_and_from_imports_are_resolved() -> None:
    source = "from . import codec\nfrom .codec import parse\nimport relay.stun as s\n"
    assert list(imports_of(source, "relay.aio.stun", False)) == [
        ("relay.aio", True),
        ("relay.aio.codec", True),
        ("relay.aio.codec", True),
        ("relay.aio.codec.parse", True),
        ("relay.stun", True),
    ]
    lazy = "def f():\n    import gateway.app\nif TYPE_CHECKING:\n    import gateway.store\n"
    assert list(imports_of(lazy, "wiregate.cli.main", False)) == [("gateway.app", False)]


@pytest.mark.parametrize(
    "entry", [["wiregate.cli.main", "agent.daemon"], ["relay.client.stun", "relay.client.probe"]]
)
def test_starting_the_agent_loads_no_control_plane(entry: list[str]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {entry!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout)
    assert "agent.daemon" in loaded or "relay.client.probe" in loaded
    assert [m for m in loaded if m.split(".")[0] in AGENT_NEVER or m.startswith(AGENT_NEVER)] == []
