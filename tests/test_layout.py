"""The package layout holds: the stages in tasks/ depend on neither Prefect flows nor the CLI, and no module of
tasks/ imports another that imports it back (an import circle), at module level or inside functions."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def runtime_nodes(tree: ast.AST):
    """Every node of a module but those under `if TYPE_CHECKING:` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imports(path: Path) -> set[str]:
    """Every module a file imports at run time (top level or inside functions), as dotted names."""
    names = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def task_modules() -> dict[str, Path]:
    """Every module of tasks/, its subpackages included, by dotted name (a package by its own name)."""
    modules = {}
    for path in (REPO / "tasks").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_tasks_never_import_flows_or_the_cli():
    offenders = {name: sorted(n for n in imports(p) if n.split(".")[0] in ("flows", "typer", "prefect"))
                 for name, p in task_modules().items()}
    assert len(offenders) > 20 and {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circle_in_tasks():
    """A package's __init__ re-exporting its modules is not a circle: its modules import each other directly."""
    modules = {m: p for m, p in task_modules().items() if m != "tasks"}
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    graph = {m: {n for n in imports(p) if n in modules and n != m and n not in packages} for m, p in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert circles == [], {m: sorted(graph[m]) for m in circles}
    assert "tasks.train.setup" in graph["tasks.train.stage"] and "tasks.lease" in graph["tasks.predict"]  # real edges


def test_no_module_of_tasks_is_over_400_lines():
    long = {m: n for m, p in task_modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
