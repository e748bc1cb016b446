"""models_admin.services.model_pull: the hub into the Hugging Face cache, with progress."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from models_admin import services
from models_admin.models import LibraryModel, ModelJob
from models_admin.progress import JobMonitor, JobProgress
from tests.support.fake_hub import TINY_REPO, FakeHub, closed_port_url

from .conftest import retrying

pytestmark = pytest.mark.django_db(transaction=True)


def _pull(**params: Any) -> ModelJob:
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO, **params}, enqueue=False)
    return services.job_run(job=job)


def _snapshot(hf_cache: Path, fake_hub: FakeHub) -> Path:
    repo = fake_hub.repos[TINY_REPO]
    return hf_cache / "models--test-org--tiny-llama" / "snapshots" / repo.commit


def test_it_pulls_weights_configs_and_tokenizer_only(
    library: Path, hf_cache: Path, fake_hub: FakeHub, tiny_files: dict[str, bytes]
) -> None:
    job = _pull()

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    snapshot = _snapshot(hf_cache, fake_hub)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(tiny_files)
    for name, data in tiny_files.items():
        assert (snapshot / name).read_bytes() == data
    # Pickles, code and the model card were never even requested.
    assert not fake_hub.file_requests("pytorch_model.bin")
    assert not fake_hub.file_requests("modeling_tiny.py")
    assert not fake_hub.file_requests("README.md")
    assert job.result["revision"] == fake_hub.repos[TINY_REPO].commit
    assert job.unit == ModelJob.Unit.BYTES
    assert job.done == job.total == sum(len(d) for d in tiny_files.values())


def test_it_links_a_loadable_pull_into_the_models_folder(
    library: Path, hf_cache: Path, fake_hub: FakeHub
) -> None:
    job = _pull(name="tiny")

    link = library / "tiny"
    assert link.is_symlink()
    assert link.resolve() == _snapshot(hf_cache, fake_hub).resolve()
    assert job.result["linked_as"] == "tiny"
    assert job.result["model_id"] == "tiny"
    entry = LibraryModel.objects.get(repo_id=TINY_REPO)
    assert entry.source == LibraryModel.Source.HF_CACHE
    assert entry.model_id == "tiny"
    assert entry.loadable and entry.has_chat_template


def test_it_records_progress_on_the_job_row_while_it_downloads(
    library: Path, fake_hub: FakeHub, fast_progress: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.bytes_per_second = 600_000
    seen: list[dict[str, Any]] = []
    flush = JobMonitor.flush

    def recording_flush(self: JobMonitor) -> None:
        flush(self)
        fields = ("step", "done", "total", "unit", "speed", "eta_seconds")
        seen.append(retrying(lambda: ModelJob.objects.values(*fields).get(pk=self.job_id)))

    monkeypatch.setattr(JobMonitor, "flush", recording_flush)

    job = _pull()

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    during = [s for s in seen if s["unit"] == "bytes" and 0 < s["done"] < s["total"]]
    assert during, seen
    assert all(s["step"].startswith("downloading") for s in during)
    assert any(s["speed"] and s["eta_seconds"] is not None for s in during)


def test_it_resumes_a_transfer_that_broke_off(
    library: Path, hf_cache: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # huggingface_hub writes what it received in 10 MiB chunks; the tiny file needs small ones
    # for a partial chunk to reach the disk before the connection breaks.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    size = len(fake_hub.repos[TINY_REPO].files["model.safetensors"])
    fake_hub.drop_after["model.safetensors"] = size // 2

    job = _pull()

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    gets = fake_hub.file_requests("model.safetensors")
    assert [g["range"] is None for g in gets] == [True, False]
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2
    # Resumed, not restarted: the second request fetched only the rest.
    assert fake_hub.served["model.safetensors"] == size // 2 + size - resumed_at
    snapshot = _snapshot(hf_cache, fake_hub)
    assert (snapshot / "model.safetensors").read_bytes() == fake_hub.repos[TINY_REPO].files[
        "model.safetensors"
    ]
    assert "resume" in job.log.lower()


def test_a_retry_resumes_the_file_a_failed_pull_left_half_done(
    library: Path, hf_cache: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from models_admin import hub

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    repo = fake_hub.repos[TINY_REPO]
    size = len(repo.files["model.safetensors"])
    fake_hub.drop_after["model.safetensors"] = size // 2
    fake_hub.down_after_drop = True  # and the hub stays down for that file: the pull fails
    blob = hf_cache / "models--test-org--tiny-llama" / "blobs" / repo.sha256("model.safetensors")

    failed = _pull()

    assert failed.state == ModelJob.State.FAILED
    assert "503" in failed.error
    kept = hub.partial_path(blob).stat().st_size
    assert 0 < kept <= size // 2

    fake_hub.unavailable.clear()
    fake_hub.requests.clear()
    retry = services.job_run(job=services.job_retry(job=failed, enqueue=False))

    assert retry.state == ModelJob.State.SUCCEEDED, retry.error
    (get,) = fake_hub.file_requests("model.safetensors")
    assert get["range"] == f"bytes={kept}-"
    assert (_snapshot(hf_cache, fake_hub) / "model.safetensors").read_bytes() == repo.files[
        "model.safetensors"
    ]
    assert not hub.partial_path(blob).exists()
    assert f"resuming model.safetensors at {kept}" in retry.log
    assert retry.done == retry.total


def test_it_skips_files_already_in_the_cache(library: Path, fake_hub: FakeHub) -> None:
    _pull()
    fake_hub.requests.clear()

    job = _pull()

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert not fake_hub.file_requests("model.safetensors")
    assert "already here" in job.log


def test_it_explains_an_unknown_repo(library: Path, fake_hub: FakeHub) -> None:
    job = _pull(repo_id="test-org/no-such-model")

    assert job.state == ModelJob.State.FAILED
    assert "No repository 'test-org/no-such-model'" in job.error
    assert fake_hub.url in job.error


def test_it_explains_a_gated_repo(library: Path, fake_hub: FakeHub, tiny_files: Any) -> None:
    fake_hub.add_repo("test-org/gated", tiny_files, gated=True)

    job = _pull(repo_id="test-org/gated")

    assert job.state == ModelJob.State.FAILED
    assert "gated" in job.error and "HF_TOKEN" in job.error


def test_it_explains_an_unknown_revision(library: Path, fake_hub: FakeHub) -> None:
    job = _pull(revision="v9")

    assert job.state == ModelJob.State.FAILED
    assert "no revision 'v9'" in job.error


def test_it_explains_that_the_hub_cannot_be_reached(library: Path, settings: Any) -> None:
    settings.MLXWEB_HF_ENDPOINT = closed_port_url()

    job = _pull()

    assert job.state == ModelJob.State.FAILED
    assert job.error.startswith("Cannot reach the Hugging Face hub at http://127.0.0.1:")
    assert "no network?" in job.error


def test_it_refuses_a_pull_that_does_not_fit_on_the_disk(
    library: Path, hf_cache: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _path: usage(100, 90, 10))

    job = _pull()

    assert job.state == ModelJob.State.FAILED
    assert job.error.startswith("The disk is full")
    assert not fake_hub.file_requests("model.safetensors")


def test_it_reports_a_disk_that_fills_up_during_the_pull(
    library: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from models_admin import hub

    def full(**_kwargs: Any) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/x.incomplete")

    monkeypatch.setattr(hub, "download", full)

    job = _pull()

    assert job.state == ModelJob.State.FAILED
    assert job.error == "The disk is full: /cache/blobs/x.incomplete could not be written."


def test_it_leaves_nothing_behind_when_cancelled_mid_transfer(
    library: Path,
    hf_cache: Path,
    fake_hub: FakeHub,
    fast_progress: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hub holds the tokenizer half-way (the weights are in, the other files are coming)
    # until the job has seen its cancel, so the transfer cannot finish first on any machine.
    tokenizer = fake_hub.repos[TINY_REPO].files["tokenizer.json"]
    fake_hub.hold_after["tokenizer.json"] = len(tokenizer) // 2
    cancel_seen = threading.Event()
    cancel = JobProgress.cancel

    def noting_cancel(self: JobProgress) -> None:
        cancel(self)
        cancel_seen.set()

    monkeypatch.setattr(JobProgress, "cancel", noting_cancel)
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO}, enqueue=False)

    def cancel_mid_transfer() -> None:
        from django.db import connection

        try:
            if fake_hub.holding.wait(30):
                retrying(lambda: services.job_cancel(job=job))
                cancel_seen.wait(30)
        finally:
            fake_hub.release.set()
            connection.close()

    canceller = threading.Thread(target=cancel_mid_transfer)
    canceller.start()
    job = services.job_run(job=job)
    canceller.join()

    assert fake_hub.holding.is_set(), "the tokenizer's transfer never reached the hold"
    assert cancel_seen.is_set(), "the job never saw the cancel"
    assert job.state == ModelJob.State.CANCELLED
    assert not (hf_cache / "models--test-org--tiny-llama").exists()
    assert not list(library.iterdir())
    # Only the cache's own marker file is left (huggingface_hub tags the cache folder).
    leftovers = [p.name for p in hf_cache.rglob("*") if p.is_file() or p.is_symlink()]
    assert leftovers == ["CACHEDIR.TAG"]
    assert "removed" in job.log
