"""A `Progress` that remembers what it was told, for tests of long weight operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RecordingProgress:
    """Appends (step, done, total) to `steps` on every `step` and `advance`; says cancelled once
    `cancel_after` entries are recorded (never, by default); calls `on_step` with each step's
    text as the step begins."""

    def __init__(
        self,
        steps: list[tuple[str, int, int]],
        *,
        cancel_after: int | None = None,
        on_step: Callable[[str], None] | None = None,
    ):
        self.steps = steps
        self.cancel_after = cancel_after
        self.on_step = on_step
        self.lines: list[str] = []
        self._step = ""
        self._done = 0
        self._total = 0

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        self._step, self._done, self._total = text, done, total or 0
        self.steps.append((text, done, self._total))
        if self.on_step is not None:
            self.on_step(text)

    def advance(self, n: int = 1) -> None:
        self._done += n
        self.steps.append((self._step, self._done, self._total))

    def rename(self, text: str) -> None:
        self._step = text

    def log(self, line: str) -> None:
        self.lines.append(line)

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.steps) >= self.cancel_after


class ForwardingProgress(RecordingProgress):
    """Records every call like RecordingProgress and passes it on to `to`, whose cancel flag it
    reports: a copy of what a long operation tells the progress it was given."""

    def __init__(self, to: Any, steps: list[tuple[str, int, int]]):
        super().__init__(steps)
        self.to = to

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        super().step(text, total=total, done=done, unit=unit)
        self.to.step(text, total=total, done=done, unit=unit)

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        self.to.advance(n)

    def log(self, line: str) -> None:
        super().log(line)
        self.to.log(line)

    @property
    def cancelled(self) -> bool:
        return bool(self.to.cancelled)
