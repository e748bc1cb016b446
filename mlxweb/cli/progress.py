"""A rich progress bar for a library job run in the command (the `ProgressMirror` that
`models_admin.services.job_run` passes each step, advance and rename on to)."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mlxweb.cli.output import notes


class JobProgressBar:
    """One bar per step of the job, on stderr; the finished steps stay on screen."""

    cancelled = False  # Ctrl-C cancels the job; the bar never asks for it

    def __init__(self, *, disable: bool) -> None:
        self.disable = disable
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        if self.disable:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[amount]}"),
                TimeRemainingColumn(),
                console=notes(),
            )
            self.progress.start()
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(
            text[:40], total=total, completed=done, amount="", bytes=unit == "bytes"
        )
        self._amount()

    def _amount(self) -> None:
        """Bytes done / total and speed for downloads, N/M for counted steps."""
        if self.progress is None or self.task is None:
            return
        task = self.progress.tasks[-1]
        column: Any = (
            (DownloadColumn(), TransferSpeedColumn())
            if task.fields.get("bytes")
            else (MofNCompleteColumn(),)
        )
        text = " ".join(str(c.render(task)) for c in column) if task.total else ""
        self.progress.update(self.task, amount=text)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)
            self._amount()

    def rename(self, text: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=text[:40])

    def log(self, line: str) -> None:
        pass  # the command prints the job's last log lines at the end

    def finish(self, job: Any) -> None:
        """Show where the job ended."""
        if self.progress is not None and self.task is not None and job.total:
            self.progress.update(self.task, completed=job.done)
            self._amount()
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None
