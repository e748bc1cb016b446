"""Ollama's `/api/pull` and `/api/delete`: model library jobs, for staff keys only.

A router of the Ollama-compatible API (mounted by `mlxweb.urls` with the rest of it); requests
authenticate with `inference.api.services` like every API request, and the jobs are the same
ones the Models page starts, validated by the same forms.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import Router, Schema

from inference.api.access import caller_of
from inference.api.errors import ApiError
from models_admin import services
from models_admin.forms import DeleteForm, PullForm
from models_admin.models import ModelJob

router = Router(tags=["library"])

POLL_S = 0.5
# How long a non-streamed pull or a delete waits for its job before answering anyway.
WAIT_S = 6 * 3600


class PullRequest(Schema):
    model: str
    insecure: bool = False
    stream: bool = True


class DeleteRequest(Schema):
    model: str


class OllamaError(Schema):
    error: str


def _staff_only(request: HttpRequest) -> Any:
    caller = caller_of(request)
    if not caller.is_staff:
        raise ApiError(403, "Only staff keys may pull or delete models.")
    return caller.user


def _pull_params(model: str) -> dict[str, Any]:
    # Ollama names a model `name:tag`; here `namespace/name:revision` on the Hugging Face hub.
    repo_id, _, tag = model.partition(":")
    revision = "" if tag in ("", "latest") else tag
    form = PullForm({"repo_id": repo_id, "revision": revision, "name": ""})
    if not form.is_valid():
        errors = [str(e) for field in form.errors.values() for e in field]
        raise ApiError(400, f"model: {' '.join(errors)}", param="model")
    return {
        "repo_id": form.cleaned_data["repo_id"],
        "revision": form.cleaned_data["revision"] or None,
        "name": form.cleaned_data["name"] or None,
    }


def _progress(job: ModelJob) -> dict[str, Any]:
    line: dict[str, Any] = {"status": job.step or job.state}
    if job.total:
        line.update(digest=f"job:{job.code}", total=job.total, completed=job.done)
    return line


async def _job_lines(job: ModelJob) -> AsyncIterator[str]:
    last: dict[str, Any] | None = None
    while True:
        await database_sync_to_async(job.refresh_from_db)()
        if job.state == ModelJob.State.SUCCEEDED:
            yield json.dumps({"status": "success"}) + "\n"
            return
        if job.state in ModelJob.RETRYABLE_STATES:
            yield json.dumps({"error": job.error or f"the job was {job.state}"}) + "\n"
            return
        line = _progress(job)
        if line != last:
            yield json.dumps(line) + "\n"
            last = line
        await asyncio.sleep(POLL_S)


async def _wait(job: ModelJob) -> ModelJob:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        await database_sync_to_async(job.refresh_from_db)()
        if not job.is_active:
            break
        await asyncio.sleep(POLL_S)
    return job


@router.post("/pull", response={200: dict[str, Any], frozenset({400, 401, 403}): OllamaError})
async def pull(request: HttpRequest, body: PullRequest) -> Any:
    """Pull a model from the Hugging Face hub as a library job; progress as NDJSON lines."""
    user = _staff_only(request)
    params = await database_sync_to_async(_pull_params)(body.model)
    job = await database_sync_to_async(services.job_create)(kind="pull", params=params, user=user)
    if body.stream:
        return StreamingHttpResponse(_job_lines(job), content_type="application/x-ndjson")
    job = await _wait(job)
    if job.state != ModelJob.State.SUCCEEDED:
        raise ApiError(500, job.error or f"the pull was {job.state}")
    return {"status": "success"}


def _delete_params(model: str) -> dict[str, Any]:
    try:
        entry = services.library_find(ref=model)
    except (services.LibraryError, services.PathRefused) as e:
        raise ApiError(404, f"model '{model}' not found", param="model") from e
    form = DeleteForm({"source": str(entry.code)})
    if not form.is_valid():
        errors = [str(e) for field in form.errors.values() for e in field]
        raise ApiError(400, " ".join(errors) or "cannot delete this model", param="model")
    return form.job_params()


@router.delete("/delete", response={200: None, frozenset({400, 401, 403, 404}): OllamaError})
async def delete(request: HttpRequest, body: DeleteRequest) -> Any:
    """Delete a model from disk (a library job, waited for)."""
    user = _staff_only(request)
    params = await database_sync_to_async(_delete_params)(body.model)
    job = await database_sync_to_async(services.job_create)(kind="delete", params=params, user=user)
    job = await _wait(job)
    if job.state != ModelJob.State.SUCCEEDED:
        raise ApiError(500, job.error or f"the delete was {job.state}")
    return HttpResponse(status=200)
