"""Terminal output: results on stdout (``console``), progress bars with ETA on stderr.

Bars are hidden when stderr is not a terminal (CI logs stay readable) or when
``QUANTAUDIT_QUIET=1``; tables and verdicts always go to stdout, so they can be piped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

# Piped output (a file, CI logs) gets a wide fixed width instead of rich's 80 columns, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160")))
status_console = Console(stderr=True)


def _enabled() -> bool:
    return status_console.is_terminal and os.environ.get("QUANTAUDIT_QUIET") != "1"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` showing a bar with count, elapsed time and ETA."""
    if not _enabled():
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=status_console, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
