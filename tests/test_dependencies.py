"""Every package the code needs is declared in pyproject.toml: what flows/, tasks/ and pipeline_config/ import in
`dependencies`, what the tests import in the `test` extra as well. (.ci/run installs into a new virtual
environment, so an undeclared package fails there too; this test names it.)"""

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import REPO

OWN = {"flows", "tasks", "pipeline_config", "bench", "tests"}


def imported_distributions(*folders: str) -> dict[tuple[str, ...], str]:
    """{the distributions that provide an imported package (any one will do): a module that imports it} over the
    imports in `folders` (mlflow comes in mlflow, mlflow-skinny and mlflow-tracing, say)."""
    by_module = importlib.metadata.packages_distributions()
    found = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top in OWN or top in sys.stdlib_module_names:
                        continue
                    found.setdefault(tuple(sorted({normal(d) for d in by_module.get(top, [top])})),
                                     str(path.relative_to(REPO)))
    return found


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {normal(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = declared(project["dependencies"])
    extras = project["optional-dependencies"]
    # a feature's extra (mlflow) may be imported where the feature runs, which says what to install without it
    features = runtime.union(*(declared(extras[name]) for name in extras if name not in ("test", "gpu")))
    missing = {d: where for d, where in imported_distributions("flows", "tasks", "pipeline_config").items()
               if not set(d) & features}
    assert not missing, f"imported but not in [project] dependencies or a feature's extra: {missing}"
    test_extra = runtime | declared(extras["test"])
    missing = {d: where for d, where in imported_distributions("tests").items() if not set(d) & test_extra}
    assert not missing, f"imported by the tests but not in the test extra: {missing}"
    # tf.summary (training's TensorBoard logs) is implemented by the tensorboard package, which tensorflow 2.21
    # no longer depends on and which no module imports by name
    assert "tensorboard" in runtime
    import tensorboard  # noqa: F401  (installed from the declaration above, in CI's new environment)
