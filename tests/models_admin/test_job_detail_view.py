"""models_admin.views.job_detail: one job's progress, log, parameters and outcome."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from models_admin.models import ModelJob

from .conftest import finished_validation

pytestmark = pytest.mark.django_db


def test_it_shows_a_job_with_its_progress_and_log(
    admin_client: Client, running_job: ModelJob
) -> None:
    response = admin_client.get(reverse("models_admin:job_detail", args=[running_job.code]))

    html = response.content.decode()
    assert response.status_code == 200
    assert "<h1>Pull org/model</h1>" in html
    assert "75.0%" in html and "3.0\xa0MB of 4.0\xa0MB" in html and "1.0\xa0MB/s" in html
    assert "ETA 1\xa0s" in html or "ETA 1 s" in html
    assert "downloading 4 files" in html and "looking up org/model@main" in html
    progress_url = reverse("models_admin:job_progress", args=[running_job.code])
    assert f'hx-get="{progress_url}?detail=1"' in html
    assert reverse("models_admin:job_cancel", args=[running_job.code]) in html


def test_it_shows_the_error_of_a_failed_job_and_offers_a_retry(
    admin_client: Client, running_job: ModelJob
) -> None:
    ModelJob.objects.filter(pk=running_job.pk).update(
        state=ModelJob.State.FAILED, error="No repository 'org/model' on https://huggingface.co"
    )

    html = admin_client.get(
        reverse("models_admin:job_detail", args=[running_job.code])
    ).content.decode()

    assert "No repository &#x27;org/model&#x27; on https://huggingface.co" in html
    assert reverse("models_admin:job_retry", args=[running_job.code]) in html
    assert "hx-trigger" not in html


def test_it_refuses_anonymous_people_non_staff_and_posts(
    client: Client, owner_client: Client, admin_client: Client, running_job: ModelJob
) -> None:
    url = reverse("models_admin:job_detail", args=[running_job.code])
    assert client.get(url).status_code == 302
    assert owner_client.get(url).status_code == 403
    assert admin_client.post(url).status_code == 405


def test_it_answers_404_for_an_unknown_job(admin_client: Client, library: Any) -> None:
    url = reverse("models_admin:job_detail", args=[uuid.uuid4()])
    assert admin_client.get(url).status_code == 404


def test_it_offers_no_second_retry_while_one_runs(
    admin_client: Client, running_job: ModelJob
) -> None:
    from models_admin import services

    ModelJob.objects.filter(pk=running_job.pk).update(state=ModelJob.State.FAILED)
    running_job.refresh_from_db()
    services.job_retry(job=running_job)

    url = reverse("models_admin:job_detail", args=[running_job.code])
    html = admin_client.get(url).content.decode()

    assert reverse("models_admin:job_retry", args=[running_job.code]) not in html


def test_it_shows_a_validations_quality_card_and_answers(
    admin_client: Client, library: Any
) -> None:
    job = finished_validation(str(library / "smollm2"))

    html = admin_client.get(reverse("models_admin:job_detail", args=[job.code])).content.decode()

    assert "<h1>Validate smollm2</h1>" in html
    assert '<strong class="agreement">97%</strong> tokens agree' in html
    assert "vs model.Q4_K_M.gguf (dequantized)" in html
    assert "<td>The capital of France is Paris.</td>" in html and "31 / 32" in html
    assert "candidate_tokens" not in html  # the report is shown as a card, not dumped
