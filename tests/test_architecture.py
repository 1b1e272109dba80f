"""The plan of the house, checked: no import cycles between Atelier's modules, and the import rules of
its architecture (which package may import which). Every import counts: at the top, inside a function
(a late import that dodges a cycle is still one) and under TYPE_CHECKING. Read with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atelier", "agents", "specialists", "training", "retrieval", "eval")
# The root modules that assemble the product from every package (the command, `atelier config show`, the demo,
# the doctor); the rest of `atelier/` is the shared kernel that every package may use, so it uses none of them.
ASSEMBLY = {"atelier.cli", "atelier.config_cli", "atelier.demo", "atelier.doctor"}
# (importer, imported): the arrows the architecture forbids.
FORBIDDEN = [("retrieval", "agents"), ("training", "agents"), ("specialists", "agents"),
             *(("atelier", package) for package in PACKAGES if package != "atelier")]


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of PACKAGES (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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


def test_the_import_graph_has_no_cycles():
    files = modules()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert sum(len(targets) for targets in graph.values()) > 100  # the walk really resolves imports
    found = cycles(graph)
    ties = ["; ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & set(cycle))) for cycle in found]
    assert not found, "import cycles (break each, e.g. move the shared part into a module both import):\n" + "\n".join(
        ties)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for every import an architecture rule forbids."""
    found = []
    for importer, targets in sorted(graph.items()):
        if importer in ASSEMBLY:
            continue
        found += [f"{importer} -> {target}" for target in sorted(targets)
                  if (importer.split(".")[0], target.split(".")[0]) in FORBIDDEN]
    return found


def test_the_import_rules_of_the_architecture_hold():
    files = modules()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert not violations(graph), ("imports that ARCHITECTURE.md forbids (retrieval, training and specialists never "
                                   "import agents; the kernel in atelier/ imports no package):\n"
                                   + "\n".join(violations(graph)))


def test_the_rule_checker_finds_a_forbidden_import():
    graph = {"specialists.runtime": {"agents.graph", "atelier.home"}, "atelier.home": {"training.data"},
             "atelier.cli": {"agents.cli"}, "agents.graph": {"specialists.runtime"}}
    assert violations(graph) == ["atelier.home -> training.data", "specialists.runtime -> agents.graph"]
