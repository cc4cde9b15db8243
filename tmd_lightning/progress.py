"""A progress bar for the long loops outside training (toy-data generation, `sample`, `evaluate`, the study).

rich's `track`, shown only on a terminal and cleared when done: a log file or CI output gets no bar redraws.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """`items`, with a transient bar on stderr when it is a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield from items
        return
    yield from track(items, description=description, total=total, console=console, transient=True)
