"""The one way long weight operations report progress and learn that they should stop.

A job row (`models_admin.progress.JobProgress`), a command-line bar and the hub download all
speak `Progress`; code in `inference.weights` takes one and never knows which it got.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where a long operation says what it does, how far it got, and asks whether to stop."""

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        """A new step: what is being done, and what `advance` counts from now on (in `unit`,
        from `done`, up to `total`; None when unknown)."""

    def advance(self, n: int = 1) -> None:
        """`n` more units of the current step are done."""

    def log(self, line: str) -> None:
        """A line for the operation's log."""

    @property
    def cancelled(self) -> bool:
        """Whether someone asked the operation to stop."""


class ConversionCancelled(Exception):
    """The progress said stop; the operation left nothing behind."""


def check_cancelled(progress: Progress | None) -> None:
    """Raise `ConversionCancelled` if `progress` was cancelled; call between units of work."""
    if progress is not None and progress.cancelled:
        raise ConversionCancelled("the operation was cancelled")


class SilentProgress:
    """A `Progress` that records nothing and is never cancelled (the loader, scripts)."""

    cancelled = False

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def log(self, line: str) -> None:
        pass
