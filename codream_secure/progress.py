"""Progress reporting the simulation can call without knowing whether anyone is watching."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichBars


class Progress(Protocol):
    """What run_simulation reports to: named tasks with a total, advanced step by step."""

    def task(self, name: str, total: int) -> int: ...

    def advance(self, task_id: int, amount: int = 1) -> None: ...

    def done(self, task_id: int) -> None: ...

    def log(self, message: str) -> None: ...


class NullProgress:
    """Reports nothing (library use, --quiet)."""

    def __init__(self) -> None:
        self._next = 0

    def task(self, name: str, total: int) -> int:
        self._next += 1
        return self._next

    def advance(self, task_id: int, amount: int = 1) -> None:
        pass

    def done(self, task_id: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass


@dataclass
class _Plain:
    name: str
    total: int
    completed: int = 0
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)


class RichProgress:
    """Live bars on a terminal; elsewhere (CI, pipes) a throttled line per task, never per step.

    Use as a context manager. Off a terminal a task prints when it finishes and, while running,
    at most once every `interval` seconds, so 10 000 dream steps do not become 10 000 lines.
    """

    def __init__(self, console: Console | None = None, *, interval: float = 10.0) -> None:
        self.console = console or Console(stderr=True)
        self.interval = interval
        self.live = self.console.is_terminal
        self._bars = _RichBars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True,
        ) if self.live else None
        self._plain: dict[int, _Plain] = {}
        self._next = 0

    def __enter__(self) -> RichProgress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()

    def task(self, name: str, total: int) -> int:
        if self._bars is not None:
            return int(self._bars.add_task(name, total=total))
        self._next += 1
        self._plain[self._next] = _Plain(name, total)
        return self._next

    def advance(self, task_id: int, amount: int = 1) -> None:
        if self._bars is not None:
            self._bars.advance(task_id, amount)  # type: ignore[arg-type]
            return
        state = self._plain.get(task_id)
        if state is None:
            return
        state.completed += amount
        now = time.monotonic()
        if now - state.last_line >= self.interval and state.completed < state.total:
            state.last_line = now
            self._line(f"{state.name}: {state.completed}/{state.total}")

    def done(self, task_id: int) -> None:
        if self._bars is not None:
            self._bars.remove_task(task_id)  # type: ignore[arg-type]
            return
        state = self._plain.pop(task_id, None)
        if state is not None and time.monotonic() - state.started >= self.interval:
            self._line(f"{state.name}: done {state.completed}/{state.total} "
                       f"in {time.monotonic() - state.started:.1f} s")

    def log(self, message: str) -> None:
        self._line(message)

    def _line(self, text: str) -> None:
        # highlight/markup off: messages are data (file names, numbers), not rich markup
        self.console.print(text, markup=False, highlight=False)
