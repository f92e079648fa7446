"""The package layout holds: the stages in tasks/ depend on neither Prefect flows nor the CLI, and no module of
tasks/ imports another that imports it back (an import circle), at module level or inside functions."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_tasks_never_import_flows_or_the_cli():
    offenders = {p.name: sorted(n for n in imports(p) if n.split(".")[0] in ("flows", "typer", "prefect"))
                 for p in (REPO / "tasks").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circle_in_tasks():
    modules = {f"tasks.{p.stem}": p for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__"}
    graph = {m: {n for n in imports(p) if n in modules and n != m} for m, p in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert circles == [], {m: sorted(graph[m]) for m in circles}
    assert graph["tasks.train"] and "tasks.train" in graph["tasks.worker"]  # the walk sees real edges
