"""Scanning the models folder and the Hugging Face cache for the library's rows.

Plain functions over paths, no database and no mlx: the web process calls them on every page
view, so they skip models whose files have not changed since the last scan. What a model is
(architecture, size, quantization, whether mlx-lm loads it) is read by inference.weights.inspect,
through inference.services; a model it cannot read becomes a row with the error, never an
exception (one bad file must not take the Models page down).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference import services as inference_services

logger = logging.getLogger(__name__)


@dataclass
class ScannedModel:
    """What the disk says about one model."""

    name: str
    source: str  # LibraryModel.Source value
    path: Path
    signature: str
    size_bytes: int
    modified_at: datetime | None
    repo_id: str = ""
    revision: str = ""
    # Details, None when the signature matched a previous scan and they were not read again.
    details: dict[str, Any] | None = field(default=None)


# Part of every signature: raised when what a scan reads from a model changes, so the next scan
# after an upgrade reads every model again instead of keeping details the old code read.
DETAILS_VERSION = 3  # 3: `task`, and embedding folders judged by the embedding loader


def path_signature(paths: list[Path]) -> tuple[str, int, datetime | None]:
    """A cheap fingerprint of a set of files (count, total size, newest mtime), their size."""
    total, newest = 0, 0
    count = 0
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        count += 1
        total += st.st_size
        newest = max(newest, st.st_mtime_ns)
    modified = datetime.fromtimestamp(newest / 1e9, tz=UTC) if newest else None
    return f"v{DETAILS_VERSION}:{count}:{total}:{newest}", total, modified


def _dir_files(path: Path) -> list[Path]:
    files: list[Path] = []
    for root, _dirs, names in os.walk(path, followlinks=False):
        files.extend(Path(root) / n for n in names)
    return files


def scan_models_dir(models_dir: Path, known: dict[str, str]) -> list[ScannedModel]:
    """Model folders and GGUF files in the models folder (GGUFs also one folder down).

    `known` maps paths to signatures from the last scan; unchanged models skip `details`.
    Links into the Hugging Face cache (made by pulls) are listed with the cache's entry instead.
    """
    found: list[ScannedModel] = []
    for model in inference_services.models_dir_find(models_dir=models_dir):
        if model.linked:
            continue
        if model.kind == "dir":
            found.append(_scanned_dir(model.path, model.name, "models_dir", known))
        else:
            found.append(_scanned_gguf(model.path, model.name, known))
    return found


def _details(inspect: Callable[..., dict[str, Any]], path: Path) -> dict[str, Any]:
    """What `inspect` reads of the model at `path`, or a row saying why it could not.

    The inspectors already turn the errors they expect into a `load_problem`; anything else
    (a bug, a file crafted to break a parser) is logged and shown the same way, because the
    page lists every model and must never fail because of one.
    """
    try:
        return inspect(path=path)
    except Exception as e:
        logger.exception("could not read the model at %s", path)
        return inference_services.model_details_unreadable(problem=f"unreadable: {e}")


def _scanned_dir(path: Path, name: str, source: str, known: dict[str, str]) -> ScannedModel:
    signature, size, modified = path_signature(_dir_files(path))
    scanned = ScannedModel(
        name=name,
        source=source,
        path=path,
        signature=signature,
        size_bytes=size,
        modified_at=modified,
    )
    if known.get(str(path)) != signature:
        scanned.details = _details(inference_services.model_dir_inspect, path)
    return scanned


def _scanned_gguf(path: Path, name: str, known: dict[str, str]) -> ScannedModel:
    signature, size, modified = path_signature([path])
    scanned = ScannedModel(
        name=name,
        source="gguf",
        path=path,
        signature=signature,
        size_bytes=size,
        modified_at=modified,
    )
    if known.get(str(path)) != signature:
        scanned.details = _details(inference_services.gguf_inspect, path)
    return scanned


def scan_hf_cache(cache_dir: Path, known: dict[str, str]) -> list[ScannedModel]:
    """One entry per cached revision of each model repo in the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    if not cache_dir.is_dir():
        return []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found: list[ScannedModel] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for revision in revisions:
            name = repo.repo_id
            if len(revisions) > 1:
                name = f"{repo.repo_id}@{revision.commit_hash[:7]}"
            scanned = _scanned_dir(revision.snapshot_path, name, "hf_cache", known)
            # Blobs count once per revision here; the cache's own accounting is the truth.
            scanned.size_bytes = revision.size_on_disk
            scanned.repo_id = repo.repo_id
            scanned.revision = revision.commit_hash
            found.append(scanned)
    return found


def links_into(models_dir: Path, target: Path) -> list[Path]:
    """Symbolic links in the models folder that point into `target`."""
    links: list[Path] = []
    if not models_dir.is_dir():
        return links
    target = Path(os.path.realpath(target))
    for child in models_dir.iterdir():
        if child.is_symlink():
            real = Path(os.path.realpath(child))
            if real == target or target in real.parents:
                links.append(child)
    return links


def tree_size(path: Path) -> int:
    """Bytes used by a file or folder, not following links."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size if path.is_symlink() else path.stat().st_size
    total = 0
    for file in _dir_files(path):
        try:
            total += file.lstat().st_size
        except OSError:
            continue
    return total
