"""models_admin.views.delete: a confirmation showing the space freed, then the delete job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from inference.models import Generation
from models_admin import services
from models_admin.models import LibraryModel, ModelJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def entry(library: Path, tiny_hf_dir: Path) -> LibraryModel:
    return services.library_find(ref="tiny-hf")


def _url(entry: LibraryModel) -> str:
    return reverse("models_admin:delete", args=[entry.code])


def test_it_asks_first_showing_the_space_it_frees(
    admin_client: Client, entry: LibraryModel
) -> None:
    Generation.objects.create(model_id="tiny-hf", state=Generation.State.STREAMING)

    response = admin_client.get(_url(entry))

    html = response.content.decode()
    assert response.status_code == 200
    assert "Delete tiny-hf?" in html
    assert f'<strong class="freed">{entry.size_bytes / 1024:.1f}\xa0KB</strong>' in html
    assert "1 reply is being written with it right now" in html
    assert f'action="{_url(entry)}"' in html
    assert not ModelJob.objects.exists()


def test_it_starts_the_delete_job(
    admin_client: Client,
    entry: LibraryModel,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(_url(entry))

    job = ModelJob.objects.get()
    assert response.status_code == 302
    assert job.kind == "delete"
    assert job.params == {"path": entry.path, "repo_id": ""}
    assert job.title == "Delete tiny-hf"
    assert enqueued[0]["queue"] == "models.light"


def test_it_refuses_anonymous_people_and_non_staff(
    client: Client, owner_client: Client, entry: LibraryModel
) -> None:
    assert client.post(_url(entry)).status_code == 302
    assert owner_client.get(_url(entry)).status_code == 403
    assert owner_client.post(_url(entry)).status_code == 403
    assert not ModelJob.objects.exists()


def test_it_refuses_other_methods(admin_client: Client, entry: LibraryModel) -> None:
    assert admin_client.put(_url(entry)).status_code == 405


def test_it_answers_404_for_a_model_that_is_gone(admin_client: Client, entry: LibraryModel) -> None:
    url = _url(entry)
    entry.delete()
    assert admin_client.get(url).status_code == 404
