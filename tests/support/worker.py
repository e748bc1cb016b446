"""The inference worker on the test's own event loop, as `manage.py serve` runs it in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from inference import runner
from inference import worker as inference_worker


@asynccontextmanager
async def in_process_worker(*, fresh_engine: bool = True) -> AsyncIterator[None]:
    """Run the worker (no warm-up) on the running loop until the block ends, then cancel it and
    its pump. With `fresh_engine` the process-wide engine is stopped before and after, so the
    worker builds one from this test's settings and catalogue; without it the test's own
    fixtures (a fake engine, say) decide which engine the worker gets."""
    if fresh_engine:
        inference_worker.stop_engine()
    task = runner.start_worker(warm_up=False)
    try:
        yield
    finally:
        task.cancel()
        loop_id = id(asyncio.get_running_loop())
        runtime = inference_worker.WorkerRuntime._by_loop.pop(loop_id, None)
        if runtime is not None:
            runtime.pump_task.cancel()
        if fresh_engine:
            await asyncio.to_thread(inference_worker.stop_engine)
