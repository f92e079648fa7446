"""Progress bars for the long stages (ingest rows, training batches, predicted rows), shown only when stderr is
a terminal; in CI, under Prefect workers and in pipes the stages' log lines are all there is, so logs stay clean.
Rich is the library (Prefect's own terminal output uses it)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

Update = Callable[..., None]  # update(advance=0, info="") moves the bar and sets its trailing text


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None, unit: str) -> Iterator[Update]:
    """A bar that disappears when done (the stage logs its own summary line); a no-op off a terminal."""
    if not on_terminal():
        yield lambda advance=0, info="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=Console(file=sys.stderr), transient=True, redirect_stdout=False,
                  redirect_stderr=False) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda advance=0, info="": bar.update(task, advance=advance, info=info)
