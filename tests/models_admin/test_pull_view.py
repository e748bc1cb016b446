"""models_admin.views.pull: validates a hub repo id and starts a pull job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from models_admin.models import ModelJob

pytestmark = pytest.mark.django_db

URL = reverse("models_admin:pull")


def test_it_starts_a_pull_job(
    admin_client: Client,
    library: Path,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(URL, {"repo_id": "mlx-community/Tiny-4bit", "revision": "v1"})

    job = ModelJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("models_admin:job_detail", args=[job.code])
    assert job.kind == "pull"
    assert job.params == {"repo_id": "mlx-community/Tiny-4bit", "revision": "v1", "name": None}
    assert job.title == "Pull mlx-community/Tiny-4bit@v1"
    assert enqueued[0]["queue"] == "models.light"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"repo_id": "not a repo"}, "namespace/name"),
        ({"repo_id": "../etc/passwd"}, "namespace/name"),
        ({"repo_id": "org/model", "revision": "../../x"}, "A revision is a branch"),
        ({"repo_id": "org/model", "name": "../escape"}, "Use letters, digits"),
        ({"repo_id": ""}, "This field is required"),
    ],
)
def test_it_explains_bad_input(
    admin_client: Client, library: Path, data: dict[str, str], message: str
) -> None:
    response = admin_client.post(URL, data)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert not ModelJob.objects.exists()


def test_it_refuses_a_name_that_is_taken(admin_client: Client, library: Path) -> None:
    (library / "taken").mkdir()

    response = admin_client.post(URL, {"repo_id": "org/model", "name": "taken"})

    assert response.status_code == 400
    assert "A model named &#x27;taken&#x27; already exists" in response.content.decode()


def test_it_shows_the_form(admin_client: Client, library: Path) -> None:
    response = admin_client.get(URL)

    assert response.status_code == 200
    assert 'name="repo_id"' in response.content.decode()


def test_it_refuses_anonymous_people_and_non_staff(
    client: Client, owner_client: Client, library: Path
) -> None:
    assert client.post(URL, {"repo_id": "org/model"}).status_code == 302
    assert owner_client.post(URL, {"repo_id": "org/model"}).status_code == 403
    assert not ModelJob.objects.exists()


def test_it_refuses_other_methods(admin_client: Client, library: Path) -> None:
    assert admin_client.put(URL).status_code == 405
