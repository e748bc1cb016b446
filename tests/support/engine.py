"""What the engine tests share: a recorder of one request's events."""

from __future__ import annotations

import threading

from inference.engine import Delta, EngineEvent, Finished, Started


class Recorder:
    """One request's events, as the engine thread emits them."""

    def __init__(self, log: list[tuple[str, EngineEvent]] | None = None) -> None:
        self.events: list[EngineEvent] = []
        self.done = threading.Event()
        self.log = log  # shared by several recorders: the order events arrived in

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        if self.log is not None:
            self.log.append((event.request_id, event))
        if isinstance(event, Finished):
            self.done.set()

    def wait(self, timeout: float = 90) -> Recorder:
        assert self.done.wait(timeout), f"no Finished within {timeout}s: {self.events[-3:]}"
        return self

    @property
    def started(self) -> Started | None:
        return next((e for e in self.events if isinstance(e, Started)), None)

    @property
    def deltas(self) -> list[Delta]:
        return [e for e in self.events if isinstance(e, Delta)]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finished(self) -> Finished:
        finished = [e for e in self.events if isinstance(e, Finished)]
        assert len(finished) == 1, self.events
        return finished[0]
