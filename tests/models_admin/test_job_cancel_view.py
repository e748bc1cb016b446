"""models_admin.views.job_cancel: sets the job's cancel flag (a queued job ends at once)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from models_admin import services
from models_admin.models import ModelJob

pytestmark = pytest.mark.django_db


def test_it_asks_a_running_job_to_stop(admin_client: Client, running_job: ModelJob) -> None:
    response = admin_client.post(reverse("models_admin:job_cancel", args=[running_job.code]))

    assert response.status_code == 302
    assert response["Location"] == reverse("models_admin:job_detail", args=[running_job.code])
    running_job.refresh_from_db()
    assert running_job.cancel_requested and running_job.state == ModelJob.State.RUNNING


def test_it_cancels_a_queued_job_at_once(admin_client: Client, library: object) -> None:
    job = services.job_create(kind="pull", params={"repo_id": "org/model"})

    admin_client.post(reverse("models_admin:job_cancel", args=[job.code]))

    job.refresh_from_db()
    assert job.state == ModelJob.State.CANCELLED


def test_it_only_takes_posts_from_staff(
    client: Client, owner_client: Client, admin_client: Client, running_job: ModelJob
) -> None:
    url = reverse("models_admin:job_cancel", args=[running_job.code])
    assert admin_client.get(url).status_code == 405
    assert client.post(url).status_code == 302
    assert owner_client.post(url).status_code == 403
    running_job.refresh_from_db()
    assert not running_job.cancel_requested
