"""Ollama's /api/pull and /api/delete (models_admin.api): library jobs for staff keys."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User

from inference.api import services as api_services
from models_admin.models import ModelJob
from tests.api.conftest import Api, read_stream

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture
def staff_api(admin_user: User) -> Api:
    return Api(api_services.api_key_create(user=admin_user, name="ops")[1])


@pytest.fixture
def user_api(owner: User) -> Api:
    return Api(api_services.api_key_create(user=owner, name="mine")[1])


async def _finish_job(state: str = ModelJob.State.SUCCEEDED, **fields: Any) -> None:
    """Play the job worker: wait for the job the request made, then end it."""
    while not await ModelJob.objects.aexists():
        await asyncio.sleep(0.02)
    await ModelJob.objects.all().aupdate(step="fetching", done=5, total=10, state="running")
    await asyncio.sleep(0.8)
    await ModelJob.objects.all().aupdate(state=state, **fields)


async def test_a_pull_streams_progress_until_success(
    staff_api: Api, library: Path, enqueued: list[dict[str, Any]]
) -> None:
    response = await staff_api.post("/api/pull", {"model": "mlx-community/Tiny-4bit"})
    finisher = asyncio.create_task(_finish_job())
    lines = [json.loads(line) for line in (await read_stream(response)).splitlines()]
    await finisher

    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    assert {k: v for k, v in lines[-2].items() if k != "digest"} == {
        "status": "fetching",
        "total": 10,
        "completed": 5,
    }
    assert lines[-1] == {"status": "success"}
    job = await ModelJob.objects.aget()
    assert job.kind == "pull" and job.params["repo_id"] == "mlx-community/Tiny-4bit"
    assert enqueued[0]["queue"] == "models.light"


async def test_a_failed_pull_ends_with_an_error_line(staff_api: Api, library: Path) -> None:
    response = await staff_api.post("/api/pull", {"model": "org/model:v2"})
    finisher = asyncio.create_task(_finish_job(ModelJob.State.FAILED, error="no such repo"))
    lines = [json.loads(line) for line in (await read_stream(response)).splitlines()]
    await finisher

    assert lines[-1] == {"error": "no such repo"}
    job = await ModelJob.objects.aget()
    assert job.params["revision"] == "v2"


async def test_a_pull_refuses_a_bad_name(staff_api: Api, library: Path) -> None:
    response = await staff_api.post("/api/pull", {"model": "../etc/passwd"})

    assert response.status_code == 400
    assert "namespace/name" in response.json()["error"]
    assert not await ModelJob.objects.aexists()


async def test_pull_and_delete_are_for_staff_keys_only(user_api: Api, library: Path) -> None:
    pulled = await user_api.post("/api/pull", {"model": "org/model"})
    deleted = await user_api.delete("/api/delete", {"model": "anything"})

    assert (pulled.status_code, deleted.status_code) == (403, 403)
    assert "staff" in pulled.json()["error"]
    assert not await ModelJob.objects.aexists()


async def test_pull_needs_a_key(library: Path) -> None:
    response = await Api(None).post("/api/pull", {"model": "org/model"})

    assert response.status_code == 401


async def test_a_delete_runs_the_library_job_and_waits(staff_api: Api, tiny_hf_dir: Path) -> None:
    finisher = asyncio.create_task(_finish_job())
    response = await staff_api.delete("/api/delete", {"model": "tiny-hf"})
    await finisher

    assert response.status_code == 200
    job = await ModelJob.objects.aget()
    assert job.kind == "delete" and job.params["path"] == str(tiny_hf_dir)


async def test_deleting_an_unknown_model_is_a_404(staff_api: Api, library: Path) -> None:
    response = await staff_api.delete("/api/delete", {"model": "nothing-here"})

    assert response.status_code == 404
    assert await sync_to_async(ModelJob.objects.count)() == 0
