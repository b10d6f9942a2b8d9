"""Terminal output: results on stdout (``console``), progress bars with ETA on stderr.

Bars are hidden when stderr is not a terminal (CI logs stay readable) or when
``QUANTAUDIT_QUIET=1``; tables and verdicts always go to stdout, so they can be piped.

In a Ray worker (:mod:`quantaudit.cluster`) every bar's progress is sent to the driver instead
(:func:`reported_to`), which draws one bar per job (:class:`JobBars`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

# Piped output (a file, CI logs) gets a wide fixed width instead of rich's 80 columns, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160")))
status_console = Console(stderr=True)
Report = Callable[[str, int, "int | None"], None]  # (bar description, items done, total or None)
_report: Report | None = None  # set in a Ray worker: where its bars go


def _enabled() -> bool:
    return status_console.is_terminal and os.environ.get("QUANTAUDIT_QUIET") != "1"


def _columns() -> tuple:
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn())


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` showing a bar with count, elapsed time and ETA."""
    if _report is not None:
        yield from _reporting(items, description, total, _report)
        return
    if not _enabled():
        yield from items
        return
    with Progress(*_columns(), console=status_console, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)


def _reporting(items: Iterable[T], description: str, total: int | None, report: Report) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    report(description, 0, total)
    for done, item in enumerate(items, 1):
        yield item
        report(description, done, total)


@contextmanager
def reported_to(report: Report):
    """Within: every bar's progress goes to ``report(description, done, total)`` instead of the terminal."""
    global _report
    previous, _report = _report, report
    try:
        yield
    finally:
        _report = previous


class JobBars:
    """One bar per job of a distributed run, each showing the step its worker is on (``show``: the workers'
    latest reports, ``{job: (description, done, total)}``); nothing is drawn where bars are hidden."""

    def __init__(self, names: list[str]):
        self.names = names
        self.progress = Progress(*_columns(), console=status_console, transient=True) if _enabled() else None
        self.tasks = {}
        self.finished: set[str] = set()

    def __enter__(self) -> JobBars:
        if self.progress is not None:
            self.progress.start()
            self.tasks = {name: self.progress.add_task(f"{name}: waiting", total=None) for name in self.names}
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def show(self, state: dict[str, tuple[str, int, int | None]]) -> None:
        if self.progress is not None:
            for name, (description, done, total) in state.items():
                if name not in self.finished:
                    self.progress.update(self.tasks[name], description=f"{name}: {description}", completed=done, total=total)

    def finish(self, name: str) -> None:
        self.finished.add(name)
        if self.progress is not None:
            self.progress.update(self.tasks[name], description=f"{name}: done", completed=1, total=1)
