"""models_admin.views.job_progress: the fragment htmx polls every second until the job ends."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from models_admin.models import ModelJob

pytestmark = pytest.mark.django_db


def test_it_serves_the_fragment_until_the_job_ends(
    admin_client: Client, running_job: ModelJob
) -> None:
    url = reverse("models_admin:job_progress", args=[running_job.code])

    running = admin_client.get(url, {"detail": "1"}, headers={"HX-Request": "true"})
    ModelJob.objects.filter(pk=running_job.pk).update(
        state=ModelJob.State.SUCCEEDED, done=4 * 1024 * 1024, finished_at=timezone.now()
    )
    finished = admin_client.get(url, headers={"HX-Request": "true"})

    html = running.content.decode()
    assert running.status_code == 200
    assert html.lstrip().startswith("<section") and "<html" not in html
    assert 'hx-trigger="every 1s"' in html and 'hx-swap="outerHTML"' in html
    assert "looking up org/model@main" in html
    # The finished fragment has no trigger, so htmx stops polling.
    assert "hx-trigger" not in finished.content.decode()
    assert "100.0%" in finished.content.decode()


def test_it_marks_a_job_failed_when_its_worker_is_gone(
    admin_client: Client, running_job: ModelJob
) -> None:
    ModelJob.objects.filter(pk=running_job.pk).update(
        heartbeat_at=timezone.now() - timedelta(minutes=5)
    )

    url = reverse("models_admin:job_progress", args=[running_job.code])
    html = admin_client.get(url).content.decode()

    assert "worker running this job stopped" in html
    assert reverse("models_admin:job_retry", args=[running_job.code]) in html


def test_it_refuses_anonymous_people_non_staff_and_posts(
    client: Client, owner_client: Client, admin_client: Client, running_job: ModelJob
) -> None:
    url = reverse("models_admin:job_progress", args=[running_job.code])
    assert client.get(url).status_code == 302
    assert owner_client.get(url).status_code == 403
    assert admin_client.post(url).status_code == 405


def test_it_answers_404_for_an_unknown_job(admin_client: Client, library: Any) -> None:
    url = reverse("models_admin:job_progress", args=[uuid.uuid4()])
    assert admin_client.get(url).status_code == 404


def test_it_reloads_the_job_page_when_the_job_ends(
    admin_client: Client, running_job: ModelJob
) -> None:
    ModelJob.objects.filter(pk=running_job.pk).update(
        state=ModelJob.State.SUCCEEDED, finished_at=timezone.now()
    )
    url = reverse("models_admin:job_progress", args=[running_job.code])

    polled = admin_client.get(url, {"detail": "1"}, headers={"HX-Request": "true"})
    plain = admin_client.get(url, {"detail": "1"})

    assert polled.status_code == 200 and polled["HX-Refresh"] == "true"
    assert "Succeeded</span>" in plain.content.decode()  # without htmx, still the fragment
