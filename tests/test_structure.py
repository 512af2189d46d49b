"""The package's shape: no import cycle between its modules, and no module over 400 lines
without a stated reason (STYLE.md: small modules with one concern each; DESIGN.md: each
layer imports only the layers below it).

Only module-level imports count: an import under ``if TYPE_CHECKING:`` or inside a function
runs later (or never) and cannot make a cycle at import time. The implicit import of a
module's parent packages is not counted either (every module would then depend on
``synth_workers/__init__.py``); an explicit ``from synth_workers import name`` is, to the
submodule ``name`` when there is one, else to the package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import synth_workers

PACKAGE = Path(synth_workers.__file__).resolve().parent
NAME = "synth_workers"
MAX_LINES = 400

#: Modules allowed over MAX_LINES, each with its reason.
ALLOWED_LONG: dict[str, str] = {
    "synth_workers.cli": (
        "one concern, the synth-workers command line: click commands and their options, "
        "each with its environment-variable mirror"
    ),
    "synth_workers.settings": (
        "one concern, the one settings object and the one place that reads the environment"
    ),
    "synth_workers.screening": (
        "one concern, the checks of a message before Celery sees it, read against the one "
        "refusal table in its docstring (415 lines)"
    ),
    "synth_workers.health": (
        "16 lines over; to split (dependency checks and heartbeat vs the HTTP probes and "
        "bootsteps), left out of the runner/producer change"
    ),
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([NAME, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported (not in functions, not under
    ``if TYPE_CHECKING:``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level(block)
            for handler in node.handlers:
                yield from _module_level(handler.body)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level(node.body)


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph() -> dict[str, set[str]]:
    """Module-level imports between the package's own modules."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _module_level(tree.body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _base(module, path, node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check below would pass vacuously with a finder that never finds anything.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_the_package_imports() -> None:
    graph = import_graph()
    assert "synth_workers.routing" in graph["synth_workers.producer"]
    assert "synth_workers.errors" in graph["synth_workers.routing"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_over_the_line_limit_without_a_reason() -> None:
    modules = _modules()
    long = {
        name: lines
        for name, path in modules.items()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    unexplained = {name: lines for name, lines in long.items() if name not in ALLOWED_LONG}
    assert not unexplained, f"modules over {MAX_LINES} lines: {unexplained}"
    stale = sorted(set(ALLOWED_LONG) - set(long))
    assert not stale, f"allowlisted modules that no longer exist or are short now: {stale}"


def _callers(function: str) -> set[str]:
    """The package's modules (other than ``routing``) that call ``function`` by name."""
    found = set()
    for module, path in _modules().items():
        if module == "synth_workers.routing":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == function:
                    found.add(module)
    return found


def test_priority_and_queue_are_resolved_in_one_place() -> None:
    # A job's priority and queue are resolved once, by synth_workers.publish.placement
    # (enqueue, enqueue_many and a group sent in bulk call it and hand the result on, which
    # does not resolve again).
    assert _callers("resolve_priority") == {"synth_workers.publish"}
    assert _callers("resolve_queue") == {"synth_workers.publish"}
    assert _callers("placement") == {
        "synth_workers.publish",
        "synth_workers.producer",
        "synth_workers.bulk",
        "synth_workers.groups",
    }
