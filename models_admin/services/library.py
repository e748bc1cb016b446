"""What the library holds: the scan that brings `LibraryModel` rows in line with the disk,
looking models up, what a delete would free, and where a model made here came from.

A model made here records where it came from in `mlxweb_source.json` (`SOURCE_RECORD`), which
is how Validate finds the reference to compare it with.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from inference import services as inference_services
from models_admin import library
from models_admin.models import LibraryModel, ModelJob
from models_admin.progress import JobError
from models_admin.services.paths import LibraryError, in_hf_cache, library_check_path

# Written into every model a job makes: where it came from (inference.weights.convert).
SOURCE_RECORD = inference_services.PROVENANCE_FILE


def catalogue_ids() -> tuple[dict[str, str], dict[str, str]]:
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
    by_path, by_repo = catalogue_ids()
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


def model_ids_for(path: Path, repo_id: str = "") -> list[str]:
    by_path, by_repo = catalogue_ids()
    real = os.path.realpath(path)
    ids = {mid for p, mid in by_path.items() if p == real}
    if repo_id and repo_id in by_repo:
        ids.add(by_repo[repo_id])
    ids.update(
        inference_services.model_id_for_folder(name=link.name)
        for link in library.links_into(Path(settings.MLXWEB_MODELS_DIR), path)
    )
    return sorted(ids)


def hf_delete_strategy(path: Path) -> Any:
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
    if in_hf_cache(path):
        freed = hf_delete_strategy(path).expected_freed_size
    else:
        freed = library.tree_size(path)
    ids = model_ids_for(path, entry.repo_id)
    links = [link.name for link in library.links_into(Path(settings.MLXWEB_MODELS_DIR), path)]
    return DeletePreview(
        freed_bytes=freed,
        active_replies=inference_services.generation_count_active(model_ids=ids),
        model_ids=ids,
        links=links,
    )


def library_source_record(*, path: str | Path) -> dict[str, Any] | None:
    """The source a model made here was made from, or None (not made here, or unreadable)."""
    return inference_services.provenance_read(path=Path(path))


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


def display_name(path: str) -> str:
    row = LibraryModel.objects.filter(path=path).only("name").first()
    return row.name if row is not None else Path(path).name
