"""The house holds: the stages in tasks/ depend on neither Prefect flows nor the CLI; no module of tasks/ imports
another that imports it back (an import circle), at module level, inside functions or for annotations only; each
room of tasks/ imports only the rooms its docstring says it may, and the rooms form no circle either; no module of
tasks/, flows/ or pipeline_config/ outgrows a screenful of screens; every module says its job first."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = {"tasks", "tasks.errors", "tasks.progress", "tasks.tracking"}  # beside the rooms: any room may use them
MAX_LINES = 350


def imports(path: Path) -> set[str]:
    """Every module a file imports (top level, inside functions, under `if TYPE_CHECKING:`), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_of(folder: str) -> dict[str, Path]:
    """Every module under a top-level folder, its subpackages included, by dotted name (a package by its own name)."""
    modules = {}
    for path in (REPO / folder).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def room(module: str) -> str:
    """tasks.data.ingest -> tasks.data; tasks.errors -> tasks.errors."""
    return ".".join(module.split(".")[:2])


def circles(graph: dict[str, set[str]]) -> list[str]:
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()) - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    return sorted(m for m in graph if reaches(m, m, set()))


def test_tasks_never_import_flows_or_the_cli():
    offenders = {name: sorted(n for n in imports(p) if n.split(".")[0] in ("flows", "typer", "prefect"))
                 for name, p in modules_of("tasks").items()}
    assert len(offenders) > 40 and {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circle_in_tasks_not_even_for_annotations():
    """A package's __init__ is a docstring: importing a module never runs another's code through it."""
    modules = {m: p for m, p in modules_of("tasks").items() if m != "tasks"}
    graph = {m: {n for n in imports(p) if n in modules and n != m} for m, p in modules.items()}
    found = circles(graph)
    assert found == [], {m: sorted(graph[m]) for m in found}
    assert "tasks.train.run" in graph["tasks.train.checkpoints"] and "tasks.store.lease" in graph["tasks.serve.predict"]
    packages = [p for m, p in modules.items() if p.name == "__init__.py"]
    assert len(packages) == 11 and all(not ast.parse(p.read_text()).body[1:] for p in packages)  # docstrings alone


def test_each_room_imports_only_what_its_docstring_allows_and_the_rooms_form_no_circle():
    modules = modules_of("tasks")
    rooms = {m: p for m, p in modules.items() if p.name == "__init__.py" and m != "tasks"}
    allowed = {}
    for name, path in rooms.items():
        text = ast.get_docstring(ast.parse(path.read_text()))
        assert "May import:" in text, f"{path.relative_to(REPO)}: its docstring says what it may import"
        allowed[name] = set(re.findall(r"tasks\.[a-z_]+", text.split("May import:", 1)[1]))
    used = {name: set() for name in rooms}
    for module, path in modules.items():
        if room(module) in rooms:
            used[room(module)] |= {room(n) for n in imports(path) if n.startswith("tasks.") and n in modules}
    extra = {name: sorted(used[name] - allowed[name] - SHARED - {name}) for name in rooms}
    assert {k: v for k, v in extra.items() if v} == {}
    graph = {name: (used[name] - SHARED - {name}) for name in rooms}
    assert circles(graph) == [], graph
    assert "tasks.store" in used["tasks.registry"] and "tasks.train" in used["tasks.tune"]  # real edges, read right


def test_no_module_is_over_350_lines():
    modules = {**modules_of("tasks"), **modules_of("flows"), **modules_of("pipeline_config")}
    long = {m: n for m, p in modules.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_module_says_its_job_first():
    modules = {**modules_of("tasks"), **modules_of("flows"), **modules_of("pipeline_config")}
    silent = sorted(m for m, p in modules.items() if not ast.get_docstring(ast.parse(p.read_text())))
    assert len(modules) > 60 and silent == []
