"""How a running job reports progress and learns that it was cancelled.

A job's service function only talks to a `JobProgress` (thread-safe, in memory), which is an
`inference.weights.progress.Progress`: the weights code a job calls reports into it directly.
A `JobMonitor` thread copies it onto the job row about once a second, with a heartbeat, and
reads the row's cancel flag back. So the code doing the work never touches the database (pull's
download threads report too), and a job whose process died is recognisable by its stale
heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from django.db import OperationalError, close_old_connections, connection
from django.utils import timezone

if TYPE_CHECKING:
    from inference.weights.progress import Progress

    class ProgressMirror(Progress, Protocol):
        """A `Progress` that also hears a step's description change (`set_step_text`)."""

        def rename(self, text: str) -> None: ...

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 200
SPEED_WINDOW_SECONDS = 5.0
# How often a running job's row is updated (progress, heartbeat) and its cancel flag read.
FLUSH_INTERVAL_SECONDS = 1.0


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is seen; the job cleans up and ends cancelled."""


class JobError(Exception):
    """A job failed for a reason a person can act on; the message is shown as the job's error."""


class JobProgress:
    """The progress of one job: current step, done/total in bytes or steps, and a log tail.

    Implements `inference.weights.progress.Progress` (step, advance, log, cancelled), and
    passes what it hears on to `mirror` (the command line's bar) as it happens.
    """

    def __init__(self, *, job_code: str = "", mirror: ProgressMirror | None = None) -> None:
        self.job_code = job_code
        self.mirror = mirror
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._step = ""
        self._done = 0
        self._total: int | None = None
        self._unit = "steps"
        self._log: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        # (monotonic time, done) samples for the speed over the last few seconds.
        self._samples: deque[tuple[float, int]] = deque()

    def step(
        self, text: str, *, total: int | None = None, unit: str = "steps", done: int = 0
    ) -> None:
        """Begin a step: its description, and what done/total count from now on."""
        with self._lock:
            self._step = text[:300]
            self._total = total
            self._unit = unit
            self._done = done
            self._samples.clear()
            self._log.append(text)
        logger.info("job %s: %s", self.job_code or "-", text)
        if self.mirror is not None:
            self.mirror.step(text, total=total, done=done, unit=unit)

    def advance(self, n: int | float = 1) -> None:
        with self._lock:
            self._done += int(n)
        if self.mirror is not None:
            self.mirror.advance(int(n))

    def set_done(self, done: int) -> None:
        with self._lock:
            delta, self._done = done - self._done, done
        if self.mirror is not None:
            self.mirror.advance(delta)

    def set_step_text(self, text: str) -> None:
        """Change the step's description without resetting its counts (e.g. "layer 3 of 30")."""
        with self._lock:
            self._step = text[:300]
        if self.mirror is not None:
            self.mirror.rename(text)

    def log(self, line: str) -> None:
        with self._lock:
            for part in str(line).splitlines() or [""]:
                self._log.append(part[:2000])
        if self.mirror is not None:
            self.mirror.log(line)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the job was cancelled; call it between steps and in callbacks."""
        if self._cancelled.is_set():
            raise JobCancelled()

    def snapshot(self) -> dict[str, Any]:
        """The fields of the job row that describe progress, with speed and ETA worked out."""
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, self._done))
            while len(self._samples) > 2 and now - self._samples[0][0] > SPEED_WINDOW_SECONDS:
                self._samples.popleft()
            speed = None
            (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
            if t1 - t0 >= 0.5 and d1 >= d0:
                speed = (d1 - d0) / (t1 - t0)
            eta = None
            if speed and self._total is not None and self._total >= self._done:
                eta = (self._total - self._done) / speed
            return {
                "step": self._step,
                "done": self._done,
                "total": self._total,
                "unit": self._unit,
                "speed": speed,
                "eta_seconds": eta,
                "log": "\n".join(self._log),
            }


class JobMonitor(threading.Thread):
    """Copies a JobProgress onto its job row every `interval` seconds and reads the cancel flag.

    Runs in its own thread with its own database connection, closed when it stops.
    """

    def __init__(
        self,
        *,
        job_id: int,
        progress: JobProgress,
        interval: float = 1.0,
    ) -> None:
        super().__init__(name=f"job-monitor-{job_id}", daemon=True)
        self.job_id = job_id
        self.progress = progress
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.interval):
                self.flush()
        finally:
            connection.close()

    def flush(self) -> None:
        from models_admin.models import ModelJob

        snapshot = self.progress.snapshot()
        try:
            ModelJob.objects.filter(pk=self.job_id).update(heartbeat_at=timezone.now(), **snapshot)
            cancel = (
                ModelJob.objects.filter(pk=self.job_id, cancel_requested=True)
                .values_list("pk", flat=True)
                .exists()
            )
        except OperationalError as e:
            # A busy database must not kill the job: the next tick tries again.
            logger.warning("job %s: could not record progress: %s", self.progress.job_code, e)
            close_old_connections()
            return
        if cancel:
            self.progress.cancel()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@contextmanager
def monitored(*, job_id: int, progress: JobProgress, interval: float = 1.0) -> Iterator[JobMonitor]:
    """Run a JobMonitor for the duration of the block."""
    monitor = JobMonitor(job_id=job_id, progress=progress, interval=interval)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.stop()
