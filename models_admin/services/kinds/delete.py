"""The `delete` job kind: a model off the disk, once no reply is streaming from it."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.template.defaultfilters import filesizeformat

from inference import services as inference_services
from models_admin import library
from models_admin.progress import JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import display_name, hf_delete_strategy, model_ids_for
from models_admin.services.paths import PathRefused, in_hf_cache, library_check_path

# How long a delete waits for replies that are streaming from the model to end.
DELETE_WAIT_SECONDS = 30 * 60
DELETE_POLL_SECONDS = 1.0


@job_kind("delete", heavy=False, describe=lambda p: f"Delete {display_name(p['path'])}")
def model_delete(*, path: str, progress: JobProgress, repo_id: str = "") -> dict[str, Any]:
    """Delete a model from disk once no reply is streaming from it; the bytes freed."""
    try:
        target = library_check_path(path=path)
    except PathRefused as e:
        raise JobError(str(e)) from e
    if not target.exists() and not target.is_symlink():
        raise JobError(f"{path} is already gone.")
    model_ids = model_ids_for(target, repo_id)
    progress.step("checking for replies in progress")
    waited, waiting_for = 0.0, 0
    while (active := inference_services.generation_count_active(model_ids=model_ids)) > 0:
        if waited >= DELETE_WAIT_SECONDS:
            raise JobError(f"Replies from {', '.join(model_ids)} are still running: try later.")
        if active != waiting_for:
            progress.step(f"waiting for {active} repl{'y' if active == 1 else 'ies'} to end")
            waiting_for = active
        progress.check_cancelled()
        time.sleep(DELETE_POLL_SECONDS)
        waited += DELETE_POLL_SECONDS
    progress.check_cancelled()

    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    progress.step(f"deleting {target}")
    if in_hf_cache(target):
        strategy = hf_delete_strategy(target)
        for link in library.links_into(models_dir, target):
            link.unlink()
            progress.log(f"removed the link {link.name}")
        strategy.execute()
        freed = int(strategy.expected_freed_size)
    elif target.is_dir() and not target.is_symlink():
        freed = library.tree_size(target)
        # Renamed first: the folder leaves the chat's model list at once, in one step.
        tomb = models_dir / f".deleting-{progress.job_code or uuid.uuid4()}"
        os.rename(target, tomb)
        shutil.rmtree(tomb)
    else:
        freed = library.tree_size(target)
        target.unlink()
        parent = target.parent
        if parent != models_dir and parent.parent == models_dir and not any(parent.iterdir()):
            parent.rmdir()
    progress.log(f"freed {filesizeformat(freed)}")
    return {"path": str(target), "freed_bytes": freed, "model_ids": model_ids}
