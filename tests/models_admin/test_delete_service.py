"""models_admin.services.model_delete: frees the space, after the replies using the model end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inference.models import Generation
from models_admin import services
from models_admin.models import LibraryModel, ModelJob
from models_admin.services.kinds import delete as delete_kind
from tests.support.fake_hub import TINY_REPO, FakeHub
from tests.support.progress import RecordingProgress

from .conftest import retrying

pytestmark = pytest.mark.django_db(transaction=True)


def _run(kind: str, **params: Any) -> ModelJob:
    job = services.job_create(kind=kind, params=params, enqueue=False)
    return services.job_run(job=job)


def test_it_deletes_a_model_folder_and_reports_the_space_freed(
    library: Path, tiny_hf_dir: Path
) -> None:
    size = sum(p.stat().st_size for p in tiny_hf_dir.iterdir())
    services.library_scan()

    job = _run("delete", path=str(tiny_hf_dir))

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert job.result["freed_bytes"] == size
    assert job.result["model_ids"] == ["tiny-hf"]
    assert list(library.iterdir()) == []
    assert not LibraryModel.objects.exists()


def test_it_deletes_a_gguf_file_and_its_emptied_folder(library: Path) -> None:
    folder = library / "some-model"
    folder.mkdir()
    (folder / "model.Q4_0.gguf").write_bytes(b"GGUF" + b"\0" * 100)

    job = _run("delete", path=str(folder / "model.Q4_0.gguf"))

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert job.result["freed_bytes"] == 104
    assert list(library.iterdir()) == []


def test_it_deletes_a_pulled_repo_and_its_link(
    library: Path, hf_cache: Path, fake_hub: FakeHub, tiny_files: dict[str, bytes]
) -> None:
    assert _run("pull", repo_id=TINY_REPO, name="tiny").state == "succeeded"
    entry = LibraryModel.objects.get(repo_id=TINY_REPO)
    preview = services.library_delete_preview(entry=entry)
    assert preview.freed_bytes == sum(len(d) for d in tiny_files.values())
    assert preview.links == ["tiny"] and preview.model_ids == ["tiny"]

    job = _run("delete", path=entry.path, repo_id=TINY_REPO)

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert job.result["freed_bytes"] == preview.freed_bytes
    assert not (library / "tiny").is_symlink()
    assert not (hf_cache / "models--test-org--tiny-llama").exists()
    assert not LibraryModel.objects.exists()


def test_it_waits_for_a_streaming_reply_to_end(
    library: Path, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch, fast_progress: None
) -> None:
    monkeypatch.setattr(delete_kind, "DELETE_POLL_SECONDS", 0.05)
    monkeypatch.setattr(delete_kind, "DELETE_WAIT_SECONDS", 15)
    reply = Generation.objects.create(model_id="tiny-hf", state=Generation.State.STREAMING)
    job = services.job_create(kind="delete", params={"path": str(tiny_hf_dir)}, enqueue=False)
    seen_while_streaming: list[bool] = []

    def finish_the_reply(text: str) -> None:
        # Called with each step the job begins, as it begins it.
        if text.startswith("waiting for 1 reply") and not seen_while_streaming:
            seen_while_streaming.append(tiny_hf_dir.exists())
            retrying(
                lambda: Generation.objects.filter(pk=reply.pk).update(
                    state=Generation.State.COMPLETE
                )
            )

    job = services.job_run(job=job, mirror=RecordingProgress([], on_step=finish_the_reply))

    assert seen_while_streaming == [True]
    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert not tiny_hf_dir.exists()


def test_it_keeps_the_model_when_cancelled_while_waiting(
    library: Path, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch, fast_progress: None
) -> None:
    monkeypatch.setattr(delete_kind, "DELETE_POLL_SECONDS", 0.05)
    monkeypatch.setattr(delete_kind, "DELETE_WAIT_SECONDS", 15)
    Generation.objects.create(model_id="tiny-hf", state=Generation.State.QUEUED)
    job = services.job_create(kind="delete", params={"path": str(tiny_hf_dir)}, enqueue=False)

    def cancel_while_waiting(text: str) -> None:
        if text.startswith("waiting"):
            retrying(lambda: services.job_cancel(job=job))

    job = services.job_run(job=job, mirror=RecordingProgress([], on_step=cancel_while_waiting))

    assert job.state == ModelJob.State.CANCELLED
    assert tiny_hf_dir.is_dir()


def test_it_refuses_paths_outside_the_allowed_folders(library: Path, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")

    job = _run("delete", path=str(victim))

    assert job.state == ModelJob.State.FAILED
    assert "refused" in job.error
    assert victim.read_text() == "keep me"


def test_it_refuses_to_delete_the_models_folder_itself(library: Path) -> None:
    job = _run("delete", path=str(library / ".." / library.name))

    assert job.state == ModelJob.State.FAILED
    assert "refused" in job.error
    assert library.is_dir()
