"""Pulling a model repo from the Hugging Face hub into the Hugging Face cache.

`huggingface_hub.snapshot_download` does the work (the cache layout, locks, Xet, retries); this
module picks the files, reports progress through a tqdm class, and turns its exceptions into
messages a person can act on. Within one pull, a dropped connection resumes where it stopped
(huggingface_hub retries with an HTTP Range request), and finished files are never fetched again.
huggingface_hub 2.x deletes a partial file when a download fails, so weights served over plain
HTTP are fetched here first, into a partial file in the cache that outlives a failed or crashed
job: the retry resumes it with a Range request. (Xet-stored files keep huggingface_hub's own path:
hf_xet's chunk cache already makes their retries incremental.) A cancelled pull removes it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from inference.services import Progress
from models_admin.progress import JobCancelled, JobError

logger = logging.getLogger(__name__)

# Weights, configs and tokenizers only. Never pickles (*.bin, *.pt, *.pth, *.pkl, *.ckpt) nor
# code (*.py): trust_remote_code is never used. `*.jinja` is a chat template, plain text.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.py"]
MAX_DOWNLOAD_THREADS = 4
# huggingface_hub writes (and reports) a download in 10 MiB chunks: on a slow link that is many
# seconds between progress updates and cancel checks. 1 MiB costs nothing measurable.
DOWNLOAD_CHUNK_BYTES = 1024 * 1024


def wanted(path: str) -> bool:
    """Whether a file of a repo is one a pull fetches."""
    return any(fnmatch(path, p) for p in ALLOW_PATTERNS) and not any(
        fnmatch(path, p) for p in IGNORE_PATTERNS
    )


@dataclass(frozen=True)
class RepoPlan:
    """What a pull will fetch: the commit, the files and their sizes."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _describe_endpoint(endpoint: str | None) -> str:
    return endpoint or "https://huggingface.co"


@contextmanager
def hub_errors(*, repo_id: str, revision: str | None, endpoint: str | None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's exceptions into JobErrors with clear messages."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _describe_endpoint(endpoint)
    try:
        yield
    except JobCancelled:
        raise
    except GatedRepoError as e:
        raise JobError(
            f"{repo_id} is a gated repository: accept its terms on the hub, then give the worker "
            "a token that may read it (HF_TOKEN, or `hf auth login` as the worker's user)."
        ) from e
    except RevisionNotFoundError as e:
        raise JobError(f"{repo_id} has no revision {revision!r} on {where}.") from e
    except RepositoryNotFoundError as e:
        raise JobError(
            f"No repository {repo_id!r} on {where}: check the id (private repos need HF_TOKEN)."
        ) from e
    except OfflineModeIsEnabled as e:
        raise JobError("Hugging Face offline mode is on (HF_HUB_OFFLINE): no pulls.") from e
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:
        raise JobError(f"Cannot reach the Hugging Face hub at {where}: no network? ({e})") from e
    except LocalEntryNotFoundError as e:
        # snapshot_download's way of saying "the hub was unreachable and nothing is cached".
        raise JobError(
            f"Cannot reach the Hugging Face hub at {where}: no network? "
            f"({type(e.__cause__).__name__ if e.__cause__ else 'connection failed'})"
        ) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise JobError(f"The hub answered HTTP {status} for {repo_id}: {e}".strip()[:500]) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise JobError(
                f"The disk is full: {e.filename or 'the cache'} could not be written."
            ) from e
        raise


def plan(
    *, repo_id: str, revision: str | None, endpoint: str | None, token: str | None = None
) -> RepoPlan:
    """Ask the hub which commit `revision` is and which wanted files it holds, with sizes."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    info = api.model_info(repo_id, revision=revision)
    if not info.sha:
        raise JobError(f"The hub did not say which commit {repo_id}@{revision or 'main'} is.")
    files = {
        entry.path: int(entry.size or 0)
        for entry in api.list_repo_tree(repo_id, revision=info.sha, recursive=True)
        if isinstance(entry, RepoFile) and wanted(entry.path)
    }
    return RepoPlan(repo_id=repo_id, revision=revision or "main", commit=info.sha, files=files)


def storage_folder(cache_dir: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def present_bytes(cache_dir: Path, plan: RepoPlan) -> int:
    """Bytes of the plan's files already in the cache's snapshot of that commit."""
    snapshot = storage_folder(cache_dir, plan.repo_id) / "snapshots" / plan.commit
    return sum(size for name, size in plan.files.items() if (snapshot / name).exists())


def check_free_space(cache_dir: Path, needed: int) -> None:
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise JobError(
            f"The disk is full: the pull needs {needed / 1e9:.2f} GB but {probe} has "
            f"{free / 1e9:.2f} GB free."
        )


class _NullWriter:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def progress_bar_class(progress: Progress) -> type[tqdm]:
    """A tqdm class for snapshot_download that reports into `progress` and stops on cancel.

    snapshot_download makes three bars from it: bytes written ("Reconstructing ..."), bytes
    received ("Downloading bytes") and files fetched ("Fetching N files"). Bytes written drive
    the job's progress; every update, from any download thread, checks the cancel flag.
    """

    class JobProgressBar(tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = _NullWriter()
            kwargs["mininterval"] = 3600
            desc = str(kwargs.get("desc") or "")
            self._role = (
                "files"
                if desc.startswith(("Fetching", "[dry-run]"))
                else "transfer"
                if desc.startswith("Downloading")
                else "bytes"
            )
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if progress.cancelled:
                raise JobCancelled()
            if self._role == "bytes" and n:
                progress.advance(int(n))
            elif self._role == "files" and n:
                progress.log(f"fetched {int(self.n + n)} of {self.total} files")
            return super().update(n)

    return JobProgressBar


def download(
    *,
    plan: RepoPlan,
    cache_dir: Path,
    endpoint: str | None,
    progress: Progress,
    token: str | None = None,
) -> Path:
    """Fetch the plan's files into the cache; the snapshot folder of the commit."""
    from huggingface_hub import constants, snapshot_download

    # A module setting that http_get reads on each call; lowered, never raised (tests lower it).
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, DOWNLOAD_CHUNK_BYTES)
    with _warnings_into(progress):
        # Weight shards in parallel, as snapshot_download would fetch them.
        weights = [name for name in plan.files if name.endswith(".safetensors")]
        with ThreadPoolExecutor(max_workers=MAX_DOWNLOAD_THREADS) as pool:
            fetches = [
                pool.submit(_fetch_resumably, plan, name, cache_dir, endpoint, token, progress)
                for name in weights
            ]
            for fetch in fetches:
                fetch.result()
        path = snapshot_download(
            plan.repo_id,
            revision=plan.revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            max_workers=MAX_DOWNLOAD_THREADS,
            tqdm_class=progress_bar_class(progress),
        )
    return Path(path)


def partial_path(blob: Path) -> Path:
    """Where a blob of the cache is downloaded to, across jobs, until it is whole."""
    return blob.with_name(f"{blob.name}.mlxweb-partial")


def _fetch_resumably(
    plan: RepoPlan,
    name: str,
    cache_dir: Path,
    endpoint: str | None,
    token: str | None,
    progress: Progress,
) -> None:
    """Put one file's blob into the cache through a partial file that a retry resumes.

    snapshot_download then finds the blob and only links it into the snapshot.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    # is_xet_available: the very check hf_hub_download makes to choose Xet (file_download
    # imports it from a private module).
    from huggingface_hub.file_download import http_get, is_xet_available
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    storage = storage_folder(cache_dir, plan.repo_id)
    if (storage / "snapshots" / plan.commit / name).exists():
        return
    url = hf_hub_url(plan.repo_id, name, revision=plan.commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    if meta.etag is None or (meta.xet_file_data is not None and is_xet_available()):
        return
    blob = storage / "blobs" / meta.etag
    partial = partial_path(blob)
    lock = cache_dir / ".locks" / storage.name / f"{meta.etag}.lock"
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():
            return
        try:
            with partial.open("ab") as f:
                have = f.tell()
                if meta.size is not None and have > meta.size:
                    f.truncate(0)  # not this file's start after all
                    have = 0
                if have:
                    progress.log(f"resuming {name} at {have} of {meta.size} bytes")
                    progress.advance(have)
                http_get(
                    meta.location,
                    f,
                    resume_size=have,
                    headers=build_hf_headers(token=token),
                    expected_size=meta.size,
                    displayed_filename=name,
                    tqdm_class=progress_bar_class(progress),
                )
        except (JobCancelled, KeyboardInterrupt):
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, blob)


class _LogTail(logging.Handler):
    def __init__(self, progress: Progress) -> None:
        super().__init__(level=logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.log(record.getMessage().splitlines()[-1] if record.getMessage() else "")


@contextmanager
def _warnings_into(progress: Progress) -> Iterator[None]:
    """huggingface_hub's warnings ("Trying to resume download...") go into the job's log too."""
    handler = _LogTail(progress)
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    try:
        yield
    finally:
        hub_logger.removeHandler(handler)


def files_under(paths: list[Path]) -> set[Path]:
    """Every file, link and folder under `paths`, to tell afterwards what a pull added."""
    found: set[Path] = set()
    for base in paths:
        if not base.exists():
            continue
        found.add(base)
        for root, dirs, names in os.walk(base, followlinks=False):
            found.update(Path(root) / d for d in dirs)
            found.update(Path(root) / n for n in names)
    return found


def remove_added(before: set[Path], paths: list[Path]) -> int:
    """Remove what appeared under `paths` since `before` was taken; the number removed."""
    added = files_under(paths) - before
    removed = 0
    # Deepest first, so folders are empty by the time they are removed.
    for path in sorted(added, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
            removed += 1
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)
    return removed
