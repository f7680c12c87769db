"""Progress of long steps, on stderr so stdout stays parseable.

On a terminal a step shows a live rich line (spinner, what runs, elapsed time; a bar when the amount of work is
known) that is replaced by a one-line record when it ends. Anywhere else (a CI log, a pipe) each finished step
writes exactly that one line, with its elapsed time, and nothing else: no control codes in a log.

A failed step writes nothing: the error line that follows says what went wrong, and bad-input errors stay the
one line on stderr that tcexport promises.

Library calls stay silent unless progress is switched on: the CLI calls configure("auto"), and the environment
variable TCEXPORT_PROGRESS=off|lines|live overrides both (tests force "lines"; scripts may force "off").
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

MODES = ("off", "lines", "live")
ENV = "TCEXPORT_PROGRESS"
REFRESH_S = 0.25  # a bar driven from a timing loop redraws at most this often

_configured = "off"
_live = None  # the one rich Progress on screen while any live step runs (rich allows one live display)
_depth = 0  # how deep the running steps nest, to indent their lines


def configure(mode: str) -> None:
    """'auto' (live on a terminal, lines elsewhere), 'off', 'lines' or 'live'."""
    global _configured
    if mode not in (*MODES, "auto"):
        raise ValueError(f"unknown progress mode {mode!r}")
    _configured = mode


def mode() -> str:
    wanted = os.environ.get(ENV, "").strip().lower() or _configured
    if wanted == "auto":
        return "live" if sys.stderr.isatty() else "lines"
    return wanted if wanted in MODES else "off"


class Step:
    """A running step: note() adds what it found to its closing line."""

    def __init__(self, text: str):
        self.text = text
        self.notes: list[str] = []
        self.start = time.perf_counter()
        self.task = None
        self.drawn = 0.0  # when its bar was last redrawn

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self) -> str:
        notes = f": {'; '.join(self.notes)}" if self.notes else ""
        return f"{'  ' * _depth}{self.text}{notes} ({format_seconds(self.elapsed)})"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


@contextlib.contextmanager
def step(text: str, total: float | None = None) -> Iterator[Step]:
    """Run a step under a progress line; total (an amount of work) turns the live line into a bar."""
    global _depth
    current = mode()
    item = Step(text)
    if current == "off":
        yield item
        return
    owner = None
    if current == "live":
        owner = _open_live()
        item.task = _live.add_task(text, total=total, start=True)
    _depth += 1
    try:
        yield item
    finally:
        _depth -= 1
        if item.task is not None:
            _live.remove_task(item.task)
        if owner is not None:
            _close_live(owner)
    # Only a step that ended well gets its line (see the module doc).
    _write(item.line())


def advance(item: Step, amount: float) -> None:
    """Move a step's bar (live mode); throttled so a timing loop is not slowed by redraws."""
    if item.task is None or _live is None:
        return
    _live.advance(item.task, amount)
    now = time.monotonic()
    if now - item.drawn >= REFRESH_S:
        _live.refresh()
        item.drawn = now


def _write(text: str) -> None:
    if _live is not None:
        _live.console.print(text, highlight=False, markup=False, soft_wrap=True)
    else:
        print(text, file=sys.stderr, flush=True)


def _open_live():
    global _live
    if _live is not None:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

    # A slow redraw (2 Hz) keeps the elapsed time of a long export ticking; ONNX Runtime and torch release the
    # GIL while they compute, so it barely touches a timed run. transient: the closing lines stay, the bar goes.
    _live = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                     TimeElapsedColumn(), console=Console(stderr=True), transient=True, auto_refresh=True,
                     refresh_per_second=2, redirect_stdout=False, redirect_stderr=False)
    _live.start()
    return _live


def _close_live(owner) -> None:
    global _live
    owner.stop()
    _live = None
