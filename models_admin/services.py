"""The model library: what other code may ask of models_admin.

Library: `library_scan`, `library_find`, `library_check_path`, `library_delete_preview`.
Jobs: `job_create`, `job_cancel`, `job_retry`, `job_run`, `job_reap_dead`, `job_cleanup_staging`.
Uploads: `upload_dir`, `upload_accept`. Quality: `library_source_record`, `library_validations`.
Job kinds, each one registered service function (see models_admin.kinds): `model_pull`,
`model_convert`, `model_quantize`, `model_import_gguf`, `model_validate`, `model_delete`.

Everything a job writes into the models folder is first written to `.staging-<job code>` and
renamed into place at the end, so a cancelled or failed job leaves no half-written model. A model
made here records where it came from in `mlxweb_source.json`, which is how Validate finds the
reference to compare it with.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from inference import services as inference_services
from inference.catalogue import model_id_for_dir
from models_admin import hub, library
from models_admin import progress as progress_module
from models_admin.kinds import get_job_kind, job_kind
from models_admin.models import LibraryModel, ModelJob
from models_admin.progress import JobCancelled, JobError, JobProgress, Listener, monitored

logger = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_NAME_RE = re.compile(NAME_PATTERN)
# A running job writes a heartbeat every second; this long without one means its process died.
HEARTBEAT_STALE_AFTER = timedelta(seconds=60)
# How long a delete waits for replies that are streaming from the model to end.
DELETE_WAIT_SECONDS = 30 * 60
DELETE_POLL_SECONDS = 1.0
# Written into every model a job makes: where it came from (see `_source_record`).
SOURCE_RECORD = "mlxweb_source.json"
GGUF_MAGIC = b"GGUF"
# Uploads nobody claimed (their request died, their job never ran) are removed after this long.
UPLOAD_ABANDONED_AFTER = timedelta(hours=1)
WORKER_GONE_ERROR = (
    "The worker running this job stopped before the job finished (it was killed, or the server "
    "restarted). Retry the job; its unfinished output is removed when a worker starts."
)


class LibraryError(Exception):
    """A model reference that names nothing in the library, or a refused path."""


class PathRefused(LibraryError):
    """A path outside the models folder and the Hugging Face cache."""


class JobStateError(Exception):
    """The job is not in a state that allows this (e.g. retrying a running job)."""


# ---------------------------------------------------------------------------------------------
# Paths


def library_roots() -> list[Path]:
    """The folders the library may read, write and delete in."""
    return [Path(settings.MLXWEB_MODELS_DIR), Path(settings.MLXWEB_HF_CACHE)]


def library_check_path(*, path: str | Path) -> Path:
    """`path` made absolute if it lies inside an allowed folder (links resolved); else refused."""
    candidate = Path(os.path.abspath(Path(path).expanduser()))
    real = Path(os.path.realpath(candidate))
    for root in library_roots():
        root_real = Path(os.path.realpath(root))
        if real != root_real and root_real in real.parents:
            return candidate
    models_dir, cache = library_roots()
    raise PathRefused(
        f"{path} is outside the models folder ({models_dir}) and the Hugging Face cache "
        f"({cache}): refused."
    )


def import_roots() -> list[Path]:
    """The folders GGUF files may be imported from: the library's and the configured ones."""
    return library_roots() + [Path(p) for p in settings.MLXWEB_IMPORT_DIRS]


def library_check_import_path(*, path: str | Path) -> Path:
    """`path` made absolute if it is a file inside a folder GGUFs may be imported from (links
    resolved, as for every library path); else PathRefused or LibraryError, saying why."""
    candidate = Path(os.path.abspath(Path(path).expanduser()))
    real = Path(os.path.realpath(candidate))
    roots = import_roots()
    if not any(Path(os.path.realpath(root)) in real.parents for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise PathRefused(
            f"{path} is outside the folders GGUF files may be imported from ({allowed}): "
            "refused. Add its folder to library.import_dirs in configs/server.yaml to allow it."
        )
    if not real.is_file():
        raise LibraryError(f"{path} is not a file.")
    return candidate


def has_gguf_magic(path: Path) -> bool:
    """Whether the file starts with the bytes every GGUF file starts with."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _in_hf_cache(path: Path) -> bool:
    cache = Path(os.path.realpath(settings.MLXWEB_HF_CACHE))
    return cache in Path(os.path.realpath(path)).parents


def _new_model_path(name: str) -> Path:
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise JobError(
            f"{name!r} is not a usable folder name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 100 characters."
        )
    path = Path(settings.MLXWEB_MODELS_DIR) / name
    if path.exists() or path.is_symlink():
        raise JobError(f"A model named {name!r} already exists in the models folder.")
    return path


def _existing_model_dir(source: str) -> Path:
    try:
        path = library_check_path(path=source)
    except PathRefused as e:
        raise JobError(str(e)) from e
    if not (path / "config.json").is_file():
        raise JobError(f"{source} is not a model folder (no config.json).")
    return path


@contextmanager
def _staging(progress: JobProgress) -> Iterator[Path]:
    """A staging folder in the models folder, removed if the block does not finish."""
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".staging-{progress.job_code or uuid.uuid4()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        progress.log("removed the unfinished output")
        raise


def _publish(staging: Path, dest: Path) -> None:
    """Move a finished model from its staging folder to its name, in one rename."""
    if dest.exists() or dest.is_symlink():
        raise JobError(f"A model named {dest.name!r} appeared while this job ran.")
    os.rename(staging, dest)


# ---------------------------------------------------------------------------------------------
# Library


def _catalogue_ids() -> tuple[dict[str, str], dict[str, str]]:
    """The chat's model ids by real path and by hub repo, from the inference catalogue."""
    from inference import services as inference

    by_path: dict[str, str] = {}
    by_repo: dict[str, str] = {}
    for spec in inference.model_list():
        if spec.kind == "hub" and spec.hub_repo:
            by_repo[spec.hub_repo] = spec.id
        elif spec.path is not None:
            by_path.setdefault(os.path.realpath(spec.path), spec.id)
    return by_path, by_repo


def library_scan() -> list[LibraryModel]:
    """Bring the library rows in line with the disk and return them, ordered by name.

    Reads only what changed since the last scan (file sizes and times are compared first).
    """
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    cache_dir = Path(settings.MLXWEB_HF_CACHE)
    existing = {row.path: row for row in LibraryModel.objects.all()}
    known = {path: row.signature for path, row in existing.items()}
    scanned = library.scan_models_dir(models_dir, known) + library.scan_hf_cache(cache_dir, known)
    by_path, by_repo = _catalogue_ids()
    last_used = inference_services.model_last_used()
    pulling = {
        params.get("repo_id")
        for params in ModelJob.objects.filter(
            kind="pull", state__in=ModelJob.ACTIVE_STATES
        ).values_list("params", flat=True)
        if isinstance(params, dict)
    }
    now = timezone.now()

    seen: set[str] = set()
    for item in scanned:
        key = str(item.path)
        if key in seen:
            continue
        seen.add(key)
        model_id = by_path.get(os.path.realpath(item.path), "") or by_repo.get(item.repo_id, "")
        values: dict[str, Any] = {
            "name": item.name[:300],
            "source": item.source,
            "model_id": model_id,
            "repo_id": item.repo_id,
            "revision": item.revision,
            "size_bytes": item.size_bytes,
            "signature": item.signature,
            "modified_at": item.modified_at,
            "scanned_at": now,
            "last_used_at": last_used.get(model_id) if model_id else None,
        }
        if item.details is not None:
            values.update(item.details)
            values["load_problem"] = str(values["load_problem"])[:300]
        if item.repo_id and item.repo_id in pulling:
            # Half-downloaded: not loadable yet, and read again by the next scan.
            values.update(loadable=False, load_problem="being downloaded", signature="")
        row = existing.get(key)
        if row is None:
            try:
                with transaction.atomic():
                    LibraryModel.objects.create(path=key, **values)
            except IntegrityError:  # another scan added it a moment ago
                LibraryModel.objects.filter(path=key).update(**values)
        else:
            LibraryModel.objects.filter(pk=row.pk).update(**values)
    LibraryModel.objects.exclude(path__in=seen).delete()
    return list(LibraryModel.objects.all())


def library_find(*, ref: str) -> LibraryModel:
    """The library model named by `ref`: its code, name, chat model id, hub repo id or path.

    Raises PathRefused for a path outside the allowed folders, LibraryError if nothing matches.
    """
    ref = ref.strip()
    if not ref:
        raise LibraryError("Name a model.")
    looks_like_path = ref.startswith(("/", "~", "."))
    if looks_like_path:
        path = library_check_path(path=ref)
        ref = str(path)
    for attempt in range(2):
        if attempt:
            library_scan()
        found = _lookup(ref)
        if found is not None:
            return found
    raise LibraryError(f"No model {ref!r} in the library.")


def _lookup(ref: str) -> LibraryModel | None:
    try:
        code = uuid.UUID(ref)
    except ValueError:
        code = None
    if code is not None:
        return LibraryModel.objects.filter(code=code).first()
    query = Q(path=ref) | Q(name=ref) | Q(repo_id=ref) | (Q(model_id=ref) & ~Q(model_id=""))
    return LibraryModel.objects.filter(query).order_by("-modified_at").first()


@dataclass(frozen=True)
class DeletePreview:
    """What deleting a library model would do, for the confirmation page."""

    freed_bytes: int
    active_replies: int
    model_ids: list[str]
    links: list[str]


def _model_ids_for(path: Path, repo_id: str = "") -> list[str]:
    by_path, by_repo = _catalogue_ids()
    real = os.path.realpath(path)
    ids = {mid for p, mid in by_path.items() if p == real}
    if repo_id and repo_id in by_repo:
        ids.add(by_repo[repo_id])
    ids.update(
        model_id_for_dir(link.name)
        for link in library.links_into(Path(settings.MLXWEB_MODELS_DIR), path)
    )
    return sorted(ids)


def _hf_delete_strategy(path: Path) -> Any:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(Path(settings.MLXWEB_HF_CACHE))
    real = Path(os.path.realpath(path))
    for repo in info.repos:
        for revision in repo.revisions:
            if Path(os.path.realpath(revision.snapshot_path)) == real:
                return info.delete_revisions(revision.commit_hash)
    raise JobError(f"{path} is not a cached revision of a Hugging Face repo.")


def library_delete_preview(*, entry: LibraryModel) -> DeletePreview:
    path = library_check_path(path=entry.path)
    if _in_hf_cache(path):
        freed = _hf_delete_strategy(path).expected_freed_size
    else:
        freed = library.tree_size(path)
    ids = _model_ids_for(path, entry.repo_id)
    links = [link.name for link in library.links_into(Path(settings.MLXWEB_MODELS_DIR), path)]
    return DeletePreview(
        freed_bytes=freed,
        active_replies=inference_services.generation_count_active(model_ids=ids),
        model_ids=ids,
        links=links,
    )


# ---------------------------------------------------------------------------------------------
# Uploads


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


def _remove_upload(path: Path) -> None:
    """Remove an upload, but only from the upload folder (a job's params are data)."""
    uploads = Path(os.path.realpath(upload_dir()))
    if Path(os.path.realpath(path)).parent == uploads:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Where models came from, and how close they are to it


def _source_record(kind: str, source: Path, progress: JobProgress, **extra: Any) -> dict[str, Any]:
    """What `mlxweb_source.json` holds: the kind of source ("gguf": a GGUF file; "hf": a
    safetensors folder; "mlx": an MLX model that was re-quantized), its path, and enough to
    tell whether it changed since (a GGUF's size and modification time)."""
    record: dict[str, Any] = {
        "kind": kind,
        "path": str(source),
        "job": progress.job_code,
        "recorded_at": timezone.now().isoformat(),
    }
    if source.is_file():
        stat = source.stat()
        record.update(size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    record.update(extra)
    return record


def _write_source_record(model_dir: Path, record: dict[str, Any]) -> None:
    (model_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def library_source_record(*, path: str | Path) -> dict[str, Any] | None:
    """The source a model made here was made from, or None (not made here, or unreadable)."""
    try:
        record = json.loads((Path(path) / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") not in {"gguf", "hf", "mlx"}:
        return None
    if not isinstance(record.get("path"), str):
        return None
    return record


def library_validations(*, entries: list[LibraryModel]) -> dict[str, ModelJob]:
    """The latest successful Validate job of each model, by path; a validation older than the
    model's files (a model re-made under the same name) does not count."""
    by_path = {entry.path: entry for entry in entries}
    if not by_path:
        return {}
    found: dict[str, ModelJob] = {}
    jobs = ModelJob.objects.filter(
        kind="validate", state=ModelJob.State.SUCCEEDED, params__source__in=list(by_path)
    ).order_by("-finished_at")
    for job in jobs:
        path = job.params.get("source")
        entry = by_path.get(path)
        if entry is None or path in found:
            continue
        if entry.modified_at and job.finished_at and job.finished_at < entry.modified_at:
            continue
        found[path] = job
    return found


# ---------------------------------------------------------------------------------------------
# Jobs


def job_create(
    *, kind: str, params: dict[str, Any], user: Any = None, enqueue: bool = True
) -> ModelJob:
    """Record a job and, once the transaction commits, hand it to the Celery worker.

    With `enqueue=False` the caller runs it itself with `job_run` (the command line does).
    """
    registered = get_job_kind(kind)
    job = ModelJob.objects.create(
        kind=kind,
        params=params,
        title=registered.describe(params)[:300],
        created_by=user if user is not None and user.is_authenticated else None,
        task_id=str(uuid.uuid4()) if enqueue else "",
    )
    if enqueue:
        _enqueue(job)
    return job


def _enqueue(job: ModelJob) -> None:
    from models_admin.tasks import run_model_job

    # apply_async_on_commit is delay_on_commit with options: the queue of the kind, and the
    # task id recorded on the row, which is how a task knows it is the one meant to run it.
    run_model_job.apply_async_on_commit(
        args=[str(job.code)], task_id=job.task_id, queue=get_job_kind(job.kind).queue
    )


def job_cancel(*, job: ModelJob) -> ModelJob:
    """Cancel a job: a queued one at once, a running one at its next check (about a second)."""
    now = timezone.now()
    updated = ModelJob.objects.filter(pk=job.pk, state=ModelJob.State.QUEUED).update(
        state=ModelJob.State.CANCELLED,
        cancel_requested=True,
        finished_at=now,
        step="cancelled before it started",
    )
    if not updated:
        ModelJob.objects.filter(pk=job.pk, state=ModelJob.State.RUNNING).update(
            cancel_requested=True
        )
    job.refresh_from_db()
    return job


def job_retry(*, job: ModelJob, user: Any = None, enqueue: bool = True) -> ModelJob:
    """A new job with the same kind and parameters as a failed or cancelled one."""
    if not job.is_retryable:
        raise JobStateError(f"A {job.state} job cannot be retried.")
    if job.retries.filter(state__in=ModelJob.ACTIVE_STATES).exists():
        raise JobStateError("This job is already being retried.")
    retry = job_create(
        kind=job.kind, params=job.params, user=user or job.created_by, enqueue=enqueue
    )
    retry.retry_of = job
    retry.save(update_fields=["retry_of"])
    return retry


def job_run(
    *,
    job: ModelJob,
    task_id: str | None = None,
    worker: str = "",
    listener: Listener | None = None,
    interval: float | None = None,
) -> ModelJob:
    """Run a queued job here and now, recording progress and its end on the row.

    Idempotent: only a queued job is run (and, given a task id, only by the task meant for it),
    so a redelivered or duplicate message does nothing. Never raises for the job's own failure;
    re-raises KeyboardInterrupt and the like after recording them.
    """
    claim = ModelJob.objects.filter(pk=job.pk, state=ModelJob.State.QUEUED)
    if task_id is not None:
        claim = claim.filter(task_id=task_id)
    now = timezone.now()
    if not claim.update(
        state=ModelJob.State.RUNNING, started_at=now, heartbeat_at=now, worker=worker[:200]
    ):
        job.refresh_from_db()
        logger.info("job %s: not run, it is %s", job.code, job.state)
        return job
    job.refresh_from_db()
    logger.info("job %s: %s started on %s", job.code, job.title, worker or "this process")

    progress = JobProgress(job_code=str(job.code))
    if job.cancel_requested:
        progress.cancel()
    state, error, result = ModelJob.State.FAILED, "", {}
    interrupted: BaseException | None = None
    try:
        with monitored(
            job_id=job.pk,
            progress=progress,
            interval=interval or progress_module.FLUSH_INTERVAL_SECONDS,
            listener=listener,
        ):
            progress.check_cancelled()
            result = get_job_kind(job.kind).run(progress=progress, **job.params) or {}
            state = ModelJob.State.SUCCEEDED
    except JobCancelled:
        state = ModelJob.State.CANCELLED
        progress.log("cancelled")
    except JobError as e:
        error = str(e)
        progress.log(f"error: {e}")
    except Exception as e:
        logger.exception("job %s failed", job.code)
        error = f"Unexpected error: {type(e).__name__}: {e}"
        progress.log(traceback.format_exc()[-4000:])
    except BaseException as e:  # KeyboardInterrupt, SystemExit: record, then let it go on
        interrupted = e
        state = ModelJob.State.CANCELLED if isinstance(e, KeyboardInterrupt) else state
        error = "" if isinstance(e, KeyboardInterrupt) else WORKER_GONE_ERROR
        progress.log(f"interrupted ({type(e).__name__})")

    snapshot = progress.snapshot()
    snapshot.update(speed=None, eta_seconds=None)
    if state == ModelJob.State.SUCCEEDED:
        snapshot["step"] = "finished"
        if snapshot["total"]:
            snapshot["done"] = snapshot["total"]
    elif state == ModelJob.State.CANCELLED:
        snapshot["step"] = "cancelled"
    finished = timezone.now()
    ModelJob.objects.filter(pk=job.pk).update(
        state=state,
        error=error[:5000],
        result=result,
        finished_at=finished,
        heartbeat_at=finished,
        **snapshot,
    )
    job.refresh_from_db()
    logger.info("job %s: %s", job.code, job.state)
    if state == ModelJob.State.SUCCEEDED:
        try:
            library_scan()
        except Exception:
            logger.exception("library scan after job %s failed", job.code)
    if interrupted is not None:
        raise interrupted
    return job


def job_reap_dead(*, worker: str | None = None) -> int:
    """Mark running jobs whose process died as failed (retryable); how many were.

    A job is dead when its heartbeat is stale, or when `worker` (a worker that just started)
    is the name it was running under.
    """
    now = timezone.now()
    dead = Q(heartbeat_at__lt=now - HEARTBEAT_STALE_AFTER) | Q(heartbeat_at__isnull=True)
    if worker:
        dead |= Q(worker=worker)
    count = ModelJob.objects.filter(Q(state=ModelJob.State.RUNNING) & dead).update(
        state=ModelJob.State.FAILED,
        error=WORKER_GONE_ERROR,
        finished_at=now,
        speed=None,
        eta_seconds=None,
    )
    if count:
        logger.warning("marked %d job(s) of a dead worker failed", count)
    return count


def job_cleanup_staging() -> int:
    """Remove staging and deleting folders left by jobs that are no longer running."""
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    if not models_dir.is_dir():
        return 0
    running = {
        str(c)
        for c in ModelJob.objects.filter(state=ModelJob.State.RUNNING).values_list(
            "code", flat=True
        )
    }
    removed = 0
    for child in models_dir.iterdir():
        prefix, _, code = child.name.partition("-")
        if prefix not in {".staging", ".deleting"} or code in running:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        logger.info("removed %s, left by a job that did not finish", child)
        removed += 1
    return removed + _cleanup_uploads()


def _cleanup_uploads() -> int:
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


# ---------------------------------------------------------------------------------------------
# Job kinds


def default_model_name(source_name: str, suffix: str) -> str:
    """A folder name for a new model: the source's last path part with a suffix, made safe."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", source_name.split("/")[-1].split("@")[0])
    base = base.strip("-._") or "model"
    return f"{base[: 99 - len(suffix)]}-{suffix}" if suffix else base[:100]


def _display_name(path: str) -> str:
    row = LibraryModel.objects.filter(path=path).only("name").first()
    return row.name if row is not None else Path(path).name


def _link_pulled(snapshot: Path, name: str, repo_id: str, progress: JobProgress) -> str | None:
    """Link a pulled model into the models folder, where the chat's catalogue finds it."""
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    models_dir.mkdir(parents=True, exist_ok=True)
    storage = hub.storage_folder(Path(settings.MLXWEB_HF_CACHE), repo_id)
    for candidate in [name] + [f"{name}-{i}" for i in range(2, 10)]:
        link = models_dir / candidate
        if link.is_symlink() and storage in Path(os.path.realpath(link)).parents:
            link.unlink()  # an older revision of the same repo: point it at this one
        if link.exists() or link.is_symlink():
            continue
        tmp = models_dir / f".staging-link-{uuid.uuid4().hex}"
        tmp.symlink_to(snapshot, target_is_directory=True)
        os.replace(tmp, link)
        progress.log(f"linked into the models folder as {candidate}")
        return candidate
    progress.log(f"not linked: the models folder already has models named {name}")
    return None


def _describe_pull(params: dict[str, Any]) -> str:
    revision = params.get("revision")
    return f"Pull {params['repo_id']}" + (f"@{revision}" if revision else "")


@job_kind("pull", heavy=False, describe=_describe_pull)
def model_pull(
    *,
    repo_id: str,
    progress: JobProgress,
    revision: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Download a repo's weights, configs and tokenizer into the Hugging Face cache.

    Links it into the models folder (so the chat can use it) when mlx-lm can load it.
    """
    if name is not None and not _NAME_RE.match(name):
        raise JobError(f"{name!r} is not a usable folder name.")
    cache_dir = Path(settings.MLXWEB_HF_CACHE)
    endpoint = settings.MLXWEB_HF_ENDPOINT
    token = os.environ.get("HF_TOKEN") or None
    storage = hub.storage_folder(cache_dir, repo_id)
    watched = [storage, cache_dir / ".locks" / storage.name]
    before = hub.files_under(watched)

    progress.start_step(f"looking up {repo_id}@{revision or 'main'}")
    with hub.hub_errors(repo_id=repo_id, revision=revision, endpoint=endpoint):
        plan = hub.plan(repo_id=repo_id, revision=revision, endpoint=endpoint, token=token)
        if not any(name.endswith(".safetensors") for name in plan.files):
            raise JobError(
                f"{repo_id} has no safetensors weights; only safetensors are pulled "
                "(pickled .bin/.pt weights never are)."
            )
        present = hub.present_bytes(cache_dir, plan)
        size = filesizeformat(plan.total_bytes)
        progress.log(
            f"commit {plan.commit[:12]}: {len(plan.files)} files, {size}"
            + (f", {filesizeformat(present)} already here" if present else "")
        )
        hub.check_free_space(cache_dir, plan.total_bytes - present)
        progress.check_cancelled()
        progress.start_step(
            f"downloading {len(plan.files)} files",
            total=plan.total_bytes,
            unit=ModelJob.Unit.BYTES,
            done=present,
        )
        try:
            snapshot = hub.download(
                plan=plan, cache_dir=cache_dir, endpoint=endpoint, progress=progress, token=token
            )
        except (JobCancelled, KeyboardInterrupt):
            removed = hub.remove_added(before, watched)
            progress.log(f"removed {removed} partly downloaded files and folders")
            raise
    progress.set_done(plan.total_bytes)
    progress.check_cancelled()

    progress.set_step_text("checking the model")
    details = library.inspect_hf_dir(snapshot)
    linked = None
    if details["loadable"]:
        linked = _link_pulled(snapshot, name or default_model_name(repo_id, ""), repo_id, progress)
    else:
        progress.log(f"not linked into the chat: {details['load_problem']}")
    return {
        "path": str(snapshot),
        "repo_id": repo_id,
        "revision": plan.commit,
        "files": len(plan.files),
        "bytes": plan.total_bytes,
        "linked_as": linked,
        "model_id": model_id_for_dir(linked) if linked else None,
        "loadable": details["loadable"],
    }


@job_kind(
    "convert",
    heavy=True,
    describe=lambda p: f"Convert {_display_name(p['source'])} to {p['name']}",
)
def model_convert(
    *,
    source: str,
    name: str,
    progress: JobProgress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
) -> dict[str, Any]:
    """Convert a Hugging Face safetensors model to MLX (optionally quantized) as `name`."""
    from models_admin import conversion

    src = _existing_model_dir(source)
    dest = _new_model_path(name)
    with _staging(progress) as staging:
        info = conversion.convert(
            source=src,
            dest=staging,
            progress=progress,
            dtype=dtype or None,
            quantize=quantize,
            bits=bits if quantize and not recipe else None,
            group_size=group_size if quantize else None,
            recipe=recipe or None,
        )
        _write_source_record(staging, _source_record("hf", src, progress))
        progress.check_cancelled()
        progress.set_step_text(f"moving into place as {name}")
        _publish(staging, dest)
    return {"path": str(dest), "name": name, "model_id": model_id_for_dir(name), **info}


@job_kind(
    "quantize",
    heavy=True,
    describe=lambda p: (
        f"Quantize {_display_name(p['source'])} to {p.get('recipe') or str(p['bits']) + '-bit'}"
    ),
)
def model_quantize(
    *,
    source: str,
    name: str,
    bits: int,
    progress: JobProgress,
    group_size: int = 64,
    recipe: str | None = None,
) -> dict[str, Any]:
    """Quantize an MLX model to fewer bits, as a new model `name` (the source is kept)."""
    from models_admin import conversion

    src = _existing_model_dir(source)
    current = library.inspect_hf_dir(src)
    if not current["is_mlx"]:
        raise JobError(f"{src.name} is not an MLX model: convert it instead.")
    if current["quant_bits"] is not None and not recipe and bits >= current["quant_bits"]:
        raise JobError(
            f"{src.name} is already {current['quant_bits']}-bit: quantize to fewer bits."
        )
    dest = _new_model_path(name)
    with _staging(progress) as staging:
        info = conversion.convert(
            source=src,
            dest=staging,
            progress=progress,
            quantize=True,
            bits=None if recipe else bits,
            group_size=group_size,
            recipe=recipe or None,
            dequantize_first=True,
        )
        _write_source_record(staging, _source_record("mlx", src, progress))
        progress.check_cancelled()
        progress.set_step_text(f"moving into place as {name}")
        _publish(staging, dest)
    return {"path": str(dest), "name": name, "model_id": model_id_for_dir(name), **info}


def _describe_import(params: dict[str, Any]) -> str:
    file_name = params.get("uploaded_as") or Path(params["source"]).name
    bits = params.get("bits")
    how = f" at {bits}-bit" if bits else ""
    return f"Import {file_name} as {params['name']}{how}"


def _import_progress(progress: JobProgress, ends: list[int]) -> Callable[[str, int, int], None]:
    """inference.gguf's progress(step, done, total) as the job's: bytes of tensors read (`ends`:
    where each tensor's bytes end, counted from the first), then the save."""

    def report(step: str, done: int, total: int) -> None:
        if step == "tensors":
            if done:
                progress.set_done(ends[min(done, len(ends)) - 1])
            else:
                progress.log(f"reading {total} tensors")
            progress.set_step_text(f"reading tensors ({done} of {total})")
        elif step == "save" and done == 0:
            progress.set_done(ends[-1] if ends else 0)
            progress.set_step_text("building and saving the MLX model")
            progress.log("building and saving the MLX model")

    return report


@job_kind("import_gguf", heavy=True, describe=_describe_import)
def model_import_gguf(
    *,
    source: str,
    name: str,
    progress: JobProgress,
    bits: int | None = None,
    group_size: int = 64,
    uploaded_as: str | None = None,
) -> dict[str, Any]:
    """Import a GGUF file as an MLX model `name`.

    Q4_0 / Q4_1 / Q8_0 tensors are kept as they are; the other types are dequantized, then
    re-quantized to `bits` (affine, `group_size`) or, without `bits`, stored as floats. The
    tokenizer and chat template come from the file. `uploaded_as` marks an upload: the file is
    removed when the job ends, whatever the outcome (a retry then asks for a new upload).
    """
    from inference import gguf
    from models_admin import conversion

    try:
        path = library_check_import_path(path=source)
    except LibraryError as e:
        if uploaded_as is not None and not Path(source).exists():
            raise JobError(
                f"The uploaded file {uploaded_as} is gone (an upload is removed when its import "
                "ends): upload it again."
            ) from e
        raise JobError(str(e)) from e
    try:
        if bits is not None and bits not in gguf.REQUANT_BITS:
            raise JobError(f"bits must be one of {', '.join(map(str, gguf.REQUANT_BITS))}.")
        if group_size not in gguf.REQUANT_GROUP_SIZES:
            raise JobError(
                f"group_size must be one of {', '.join(map(str, gguf.REQUANT_GROUP_SIZES))}."
            )
        dest = _new_model_path(name)
        progress.start_step(f"reading the header of {uploaded_as or path.name}")
        try:
            header = gguf.read_header(path)
        except gguf.GGUFError as e:
            raise JobError(str(e)) from e
        ends = list(itertools.accumulate(t.nbytes for t in header.tensors))
        architecture = header.metadata.get("general.architecture", "?")
        progress.log(
            f"{architecture}, {len(header.tensors)} tensors, {filesizeformat(path.stat().st_size)}"
        )
        progress.start_step(
            "reading the tokenizer", total=ends[-1] if ends else 0, unit=ModelJob.Unit.BYTES
        )
        with _staging(progress) as staging:
            try:
                result = gguf.import_gguf(
                    path,
                    staging / "model",
                    bits=bits,
                    group_size=group_size,
                    progress=_import_progress(progress, ends),
                    should_cancel=lambda: progress.cancelled,
                )
            except gguf.ConversionCancelled as e:
                raise JobCancelled() from e
            except gguf.GGUFError as e:
                raise JobError(str(e)) from e
            finally:
                conversion.release_memory()
            record = _source_record(
                "gguf",
                path,
                progress,
                bits=bits,
                group_size=group_size if bits else None,
                uploaded_as=uploaded_as,
            )
            _write_source_record(staging / "model", record)
            progress.check_cancelled()
            progress.set_step_text(f"moving into place as {name}")
            _publish(staging / "model", dest)
            staging.rmdir()
    finally:
        if uploaded_as is not None:
            _remove_upload(path)
    quantization = result.quantization
    progress.log(f"stored: {_describe_quantization(quantization)}")
    return {
        "path": str(dest),
        "name": name,
        "model_id": model_id_for_dir(name),
        "source": str(path) if uploaded_as is None else uploaded_as,
        "architecture": result.architecture,
        "model_type": result.model_type,
        "parameters": result.parameters,
        "bits": bits,
        "group_size": group_size if bits else None,
        "stored": _describe_quantization(quantization),
        "size_bytes": result.size_bytes,
        "source_size_bytes": result.source_size_bytes,
        "seconds": round(result.seconds, 2),
    }


def _describe_quantization(summary: dict[str, Any]) -> str:
    """inference.gguf's summary of what became of each tensor, in a line for people."""
    parts = []
    kept = summary.get("kept") or {}
    if kept:
        parts.append("kept " + ", ".join(f"{n} {t}" for t, n in sorted(kept.items())))
    requantized = summary.get("requantized") or {}
    if requantized.get("tensors"):
        sources = ", ".join(f"{n} {t}" for t, n in sorted((requantized.get("from") or {}).items()))
        parts.append(
            f"re-quantized {requantized['tensors']} to {requantized.get('bits')}-bit "
            f"(group {requantized.get('group_size')}; from {sources})"
        )
    if summary.get("float"):
        parts.append(f"{summary['float']} as {summary.get('dtype') or 'float'}")
    return "; ".join(parts) or "nothing"


def _reference_for(record: dict[str, Any], progress: JobProgress) -> tuple[str, Path]:
    """The reference a model's source record names, checked: its kind ("gguf" or "dir") and
    path. Raises JobError when it is gone, changed or no longer in an allowed folder."""
    path = Path(record["path"])
    if record["kind"] == "gguf":
        if record.get("uploaded_as"):
            raise JobError(
                f"It was imported from an upload ({record['uploaded_as']}) that was not kept: "
                "there is no GGUF to compare it with. Import it again from a kept file."
            )
        if not path.is_file():
            raise JobError(f"The GGUF it was imported from ({path}) is gone.")
        try:
            library_check_import_path(path=path)
        except LibraryError as e:
            raise JobError(f"Its source GGUF cannot be read: {e}") from e
        stat = path.stat()
        if record.get("size_bytes") not in (None, stat.st_size):
            raise JobError(f"The GGUF it was imported from ({path}) has changed since (size).")
        if record.get("mtime_ns") not in (None, stat.st_mtime_ns):
            progress.log(f"note: {path.name} was modified after the import (same size)")
        return "gguf", path
    if not (path / "config.json").is_file():
        raise JobError(f"The model it was made from ({path}) is gone.")
    try:
        library_check_path(path=path)
    except PathRefused as e:
        raise JobError(f"Its source cannot be read: {e}") from e
    return "dir", path


def _describe_run(run: Any) -> str:
    speed = f"{run.decode_tok_s:.1f} tok/s" if run.decode_tok_s else "no decode speed"
    return f"{run.label}: perplexity {run.perplexity:.2f}, {speed}, measured in {run.seconds:.0f} s"


@job_kind("validate", heavy=True, describe=lambda p: f"Validate {_display_name(p['source'])}")
def model_validate(*, source: str, progress: JobProgress, n_tokens: int = 32) -> dict[str, Any]:
    """Compare a model made here with the source it was made from: the same prompts answered
    greedily (share of identical tokens over the first `n_tokens`), a short text's perplexity
    from both, size and decode speed (inference.evaluation). The two models are loaded one
    after the other, so memory holds one at a time."""
    from inference import evaluation, gguf
    from models_admin import conversion

    src = _existing_model_dir(source)
    record = library_source_record(path=src)
    if record is None:
        raise JobError(
            f"{src.name} has no record of what it was made from ({SOURCE_RECORD}): only models "
            "imported, converted or quantized here can be validated."
        )
    if not 1 <= n_tokens <= 1024:
        raise JobError("n_tokens must be between 1 and 1024.")
    kind, ref_path = _reference_for(record, progress)
    reference_label = f"{ref_path.name} (dequantized)" if kind == "gguf" else ref_path.name
    progress.start_step(f"loading the reference, {reference_label}", total=4)
    try:
        try:
            if kind == "gguf":
                reference = evaluation.gguf_reference(ref_path)
            else:
                reference = evaluation.hf_reference(ref_path)
        except gguf.GGUFError as e:
            raise JobError(str(e)) from e
        progress.advance()
        progress.check_cancelled()
        prompts = list(evaluation.DEFAULT_PROMPTS)
        progress.set_step_text(
            f"running the reference: {len(prompts)} prompts x {n_tokens} tokens, perplexity"
        )
        reference_run = evaluation.measure_model(
            *reference, label=reference_label, prompts=prompts, n_tokens=n_tokens, path=ref_path
        )
        progress.log(_describe_run(reference_run))
        del reference
        conversion.release_memory()
        progress.advance()
        progress.check_cancelled()

        progress.log(f"loading {src.name}")
        progress.set_step_text(f"loading {src.name}")
        candidate = evaluation.hf_reference(src)
        progress.advance()
        progress.check_cancelled()
        progress.set_step_text(f"running {src.name}")
        candidate_run = evaluation.measure_model(
            *candidate, label=src.name, prompts=prompts, n_tokens=n_tokens, path=src
        )
        progress.log(_describe_run(candidate_run))
        del candidate
        progress.advance()
    finally:
        conversion.release_memory()
    report = evaluation.compare_runs(candidate_run, reference_run)
    progress.log(report.summary())
    logger.info("job %s: %s", progress.job_code or "-", report.summary())
    return {
        **report.to_dict(),
        "summary": report.summary(),
        "path": str(src),
        "reference_kind": record["kind"],
        "reference_path": str(ref_path),
    }


@job_kind("delete", heavy=False, describe=lambda p: f"Delete {_display_name(p['path'])}")
def model_delete(*, path: str, progress: JobProgress, repo_id: str = "") -> dict[str, Any]:
    """Delete a model from disk once no reply is streaming from it; the bytes freed."""
    try:
        target = library_check_path(path=path)
    except PathRefused as e:
        raise JobError(str(e)) from e
    if not target.exists() and not target.is_symlink():
        raise JobError(f"{path} is already gone.")
    model_ids = _model_ids_for(target, repo_id)
    progress.start_step("checking for replies in progress")
    waited = 0.0
    while (active := inference_services.generation_count_active(model_ids=model_ids)) > 0:
        if waited >= DELETE_WAIT_SECONDS:
            raise JobError(f"Replies from {', '.join(model_ids)} are still running: try later.")
        progress.set_step_text(f"waiting for {active} repl{'y' if active == 1 else 'ies'} to end")
        progress.check_cancelled()
        time.sleep(DELETE_POLL_SECONDS)
        waited += DELETE_POLL_SECONDS
    progress.check_cancelled()

    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    progress.start_step(f"deleting {target}")
    if _in_hf_cache(target):
        strategy = _hf_delete_strategy(target)
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
