"""The package's shape, read from its source: no module in distgan/ over 400 lines, no import
cycles between distgan's modules (imports inside functions count; those only for type checkers do
not), the dependency rules (models plain torch, DALI only in data, Accelerate only in training,
outputs and the launcher, export's inference torch-free), and a training loop that fits a
screen."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "distgan"
MAX_MODULE_LINES = 400
MAX_LOOP_LINES = 40


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_names(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module `path` imports (top-level, or also inside functions), as dotted names; `from
    a import b` counts as a.b where that is a module, else as a."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return found


def distgan_graph() -> dict[str, set[str]]:
    return {name: imported_names(path) & MODULES.keys() for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_in_distgan_is_over_400_lines():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_distgan_has_no_import_cycles():
    graph = distgan_graph()
    assert sum(map(len, graph.values())) > 50  # the graph was read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def third_party(name: str) -> set[str]:
    return {imported.split(".")[0] for imported in imported_names(MODULES[name])}


def test_the_dependency_rules_hold():
    subpackage = {name: name.split(".")[1] if "." in name else "" for name in MODULES}
    for name in MODULES:
        outside = {m for m in third_party(name) if m != "distgan"}
        if subpackage[name] == "models":  # plain torch, and the config it is built from
            assert outside - sys.stdlib_module_names <= {"torch"}, (name, outside)
            # At import time; from_pretrained loads its loader when called (the cycle test checks
            # that the loader does not import models back).
            at_import = imported_names(MODULES[name], top_level_only=True)
            distgan_deps = {m for m in at_import if m.startswith("distgan.")}
            assert all(m.startswith(("distgan.models", "distgan.config")) for m in distgan_deps)
        if "nvidia" in outside:
            assert subpackage[name] == "data", f"{name} imports DALI"
        if "accelerate" in outside:
            assert subpackage[name] in ("training", "outputs", "runtime"), name
    assert "torch" not in third_party("distgan.config.config")  # the command line is torch-free


def test_the_training_loop_fits_a_screen():
    tree = ast.parse(MODULES["distgan.training.trainer"].read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    loop = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= MAX_LOOP_LINES
