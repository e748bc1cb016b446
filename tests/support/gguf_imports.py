"""GGUF files imported through the real `import_gguf` job once per test session.

An import of Gemma 3 270M takes about a minute on a 2-core CPU and SmolLM2's several seconds, so
the session imports each once, the way the app does (`job_create` + `job_run`, into a models
folder of its own), and every test that needs the imported folder, the job or what the import
reported shares that.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from inference.weights.convert import ImportResult
from tests.support.progress import ForwardingProgress


def place(source: Path, folder: Path) -> Path:
    """The file in `folder` as a real file (a hard link where it can be, else a copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / source.name
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy(source, dest)
    return dest


@dataclass
class SessionImport:
    """A GGUF imported by an `import_gguf` job that ran at the start of the session.

    `job` is the job as its row was when it ended (the row itself is gone, so that tests
    counting jobs see none of the session's); `entries` are the library rows its closing scan
    wrote, as they were. `result` is what the import returned to the job and `steps` what it
    reported to its progress, (step, done, total) per call.
    """

    job: Any  # models_admin.models.ModelJob
    result: ImportResult
    steps: list[tuple[str, int, int]]
    models_dir: Path
    source: Path
    entries: dict[str, Any] = field(default_factory=dict)  # path -> LibraryModel

    @property
    def out_dir(self) -> Path:
        return Path(self.job.result["path"])


def import_once(
    gguf: Path, root: Path, db_blocker: Any, *, name: str, **options: Any
) -> SessionImport:
    """Import `gguf` as `name` through the `import_gguf` job, in a models folder under `root`
    (the file placed in its `gguf/` folder), with database access unblocked for the session
    fixture calling it; the job's rows are deleted once read."""
    from inference import services as inference_services
    from inference.catalogue import reset_catalogue
    from models_admin import services
    from models_admin.models import LibraryModel, ModelJob

    models_dir = root / "models"
    source = place(gguf, models_dir / "gguf")
    results: list[ImportResult] = []
    steps: list[tuple[str, int, int]] = []
    real_import = inference_services.gguf_import

    def recorded_import(*, progress: Any, **kwargs: Any) -> ImportResult:
        # The job's own progress still gets every call; a copy of each is kept for the tests
        # of what the import reports.
        result = real_import(progress=ForwardingProgress(progress, steps), **kwargs)
        results.append(result)
        return result

    with ExitStack() as stack:
        stack.enter_context(db_blocker.unblock())
        stack.enter_context(
            override_settings(
                MLXWEB_MODELS_DIR=models_dir,
                MLXWEB_CONVERTED_DIR=root / "converted",
                MLXWEB_HF_CACHE=root / "hf-cache",
            )
        )
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(inference_services, "gguf_import", recorded_import)
        stack.callback(reset_catalogue)
        reset_catalogue()
        params = {"source": str(source), "name": name, **options}
        job = services.job_create(kind="import_gguf", params=params, enqueue=False)
        try:
            job = services.job_run(job=job)
            entries = {
                row.path: row
                for row in LibraryModel.objects.filter(path__startswith=str(models_dir))
            }
        finally:
            LibraryModel.objects.filter(path__startswith=str(models_dir)).delete()
            ModelJob.objects.filter(pk=job.pk).delete()
    if job.state != ModelJob.State.SUCCEEDED or not results:
        pytest.fail(f"the session's import of {gguf.name} failed: {job.error}\n{job.log}")
    return SessionImport(
        job=job,
        result=results[0],
        steps=steps,
        models_dir=models_dir,
        source=source,
        entries=entries,
    )
