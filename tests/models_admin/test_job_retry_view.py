"""models_admin.views.job_retry: a failed or cancelled job again, as a new job."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from models_admin.models import ModelJob

pytestmark = pytest.mark.django_db


def test_it_retries_a_failed_job(
    admin_client: Client,
    running_job: ModelJob,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    ModelJob.objects.filter(pk=running_job.pk).update(state=ModelJob.State.FAILED, error="boom")

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("models_admin:job_retry", args=[running_job.code]))

    retry = ModelJob.objects.get(retry_of=running_job)
    assert response["Location"] == reverse("models_admin:job_detail", args=[retry.code])
    assert retry.params == running_job.params and retry.state == ModelJob.State.QUEUED
    assert enqueued[-1]["task_id"] == retry.task_id


def test_it_explains_why_a_running_job_cannot_be_retried(
    admin_client: Client, running_job: ModelJob
) -> None:
    url = reverse("models_admin:job_retry", args=[running_job.code])

    response = admin_client.post(url, follow=True)

    assert "A running job cannot be retried." in response.content.decode()
    assert not ModelJob.objects.filter(retry_of=running_job).exists()


def test_it_only_takes_posts_from_staff(
    client: Client, owner_client: Client, admin_client: Client, running_job: ModelJob
) -> None:
    ModelJob.objects.filter(pk=running_job.pk).update(state=ModelJob.State.FAILED)
    url = reverse("models_admin:job_retry", args=[running_job.code])
    assert admin_client.get(url).status_code == 405
    assert client.post(url).status_code == 302
    assert owner_client.post(url).status_code == 403
    assert not ModelJob.objects.filter(retry_of=running_job).exists()
