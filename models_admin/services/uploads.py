"""GGUF uploads once they are on disk: taking one as an import's source, and removing the
ones no job will read. (Receiving the bytes is the view's `models_admin.uploads` handler.)"""

from __future__ import annotations

import itertools
import logging
import os
import re
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from models_admin.models import ModelJob

logger = logging.getLogger(__name__)

# Uploads nobody claimed (their request died, their job never ran) are removed after this long.
UPLOAD_ABANDONED_AFTER = timedelta(hours=1)


def upload_dir() -> Path:
    """Where GGUF uploads are written: hidden in the models folder (on the same disk as the
    model they become, and skipped by scans and the chat's catalogue)."""
    return Path(settings.MLXWEB_MODELS_DIR) / ".uploads"


def _safe_file_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem).strip("-._") or "upload"
    return f"{stem[:90]}.gguf"


def upload_accept(*, path: Path, file_name: str, keep: bool) -> tuple[Path, str | None]:
    """Take a finished upload (`path`, in the upload folder) as the source of an import.

    Kept uploads move into the models folder under their own (made safe) name and become a
    library GGUF; the others get a fresh name in the upload folder and are removed by their
    import job when it ends. Returns the file's path and, for the latter, the name it was
    uploaded under (the job's `uploaded_as`).
    """
    if keep:
        target = Path(settings.MLXWEB_MODELS_DIR) / _safe_file_name(file_name)
        for i in itertools.count(2):
            if not target.exists() and not target.is_symlink():
                break
            target = target.with_name(f"{Path(_safe_file_name(file_name)).stem}-{i}.gguf")
        os.rename(path, target)
        return target, None
    target = upload_dir() / f"{uuid.uuid4()}.gguf"
    os.rename(path, target)
    return target, file_name[:200]


def upload_remove(path: Path) -> None:
    """Remove an upload, but only from the upload folder (a job's params are data)."""
    uploads = Path(os.path.realpath(upload_dir()))
    if Path(os.path.realpath(path)).parent == uploads:
        path.unlink(missing_ok=True)


def upload_cleanup() -> int:
    """Remove uploads no queued or running job will read, once they are an hour old."""
    uploads = upload_dir()
    if not uploads.is_dir():
        return 0
    wanted = {
        os.path.realpath(params["source"])
        for params in ModelJob.objects.filter(
            kind="import_gguf", state__in=ModelJob.ACTIVE_STATES
        ).values_list("params", flat=True)
        if isinstance(params, dict) and isinstance(params.get("source"), str)
    }
    cutoff = (timezone.now() - UPLOAD_ABANDONED_AFTER).timestamp()
    removed = 0
    for child in uploads.iterdir():
        if os.path.realpath(child) in wanted:
            continue
        try:
            if child.lstat().st_mtime > cutoff:
                continue
            child.unlink()
        except OSError:
            continue
        logger.info("removed %s, an upload no job will import", child)
        removed += 1
    return removed
