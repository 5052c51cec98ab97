"""Logging and progress that follow the house rules.

A rich progress bar appears only when stderr is a terminal and ``--quiet`` is off, so
pipes, Makefiles and CI stay clean. Messages go to stderr; stdout is reserved for data
(``-`` outputs).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_state = {"verbosity": 1}  # 0 quiet, 1 normal, 2 verbose


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    _state["verbosity"] = 0 if quiet else (2 if verbose else 1)


def verbosity() -> int:
    return _state["verbosity"]


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)  # never break a message line in pipes


def info(message: str) -> None:
    """A normal status message (hidden by ``--quiet``)."""
    if _state["verbosity"] >= 1:
        _console().print(message, markup=False)


def debug(message: str) -> None:
    """A detail shown only with ``--verbose``."""
    if _state["verbosity"] >= 2:
        _console().print(message, markup=False, style="dim")


def warn(message: str) -> None:
    """A warning; shown even with ``--quiet`` because it may change how results are read."""
    _console().print(f"warning: {message}", markup=False, style="yellow")


def _bar_enabled() -> bool:
    return _state["verbosity"] >= 1 and sys.stderr.isatty()


def track(items: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a terminal, silently otherwise."""
    if not _bar_enabled():
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, console=_console(), transient=True)


@contextmanager
def task(description: str, total: float | None = None):
    """A progress context for work that is advanced by hand: ``with task(...) as advance``."""
    if not _bar_enabled():
        yield lambda n=1: None
        return
    from rich.progress import Progress

    with Progress(console=_console(), transient=True) as progress:
        tid = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(tid, n)
