"""models_admin.views.convert: the convert form for one library model, starting the job."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from models_admin import services
from models_admin.models import LibraryModel, ModelJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def entry(library: Path, tiny_hf_dir: Path) -> LibraryModel:
    return services.library_find(ref="tiny-hf")


def _url(entry: LibraryModel) -> str:
    return reverse("models_admin:convert", args=[entry.code])


def test_it_starts_a_conversion_with_a_made_up_name(
    admin_client: Client,
    entry: LibraryModel,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            _url(entry), {"quantize": "on", "bits": "4", "group_size": "64", "dtype": "float16"}
        )

    job = ModelJob.objects.get()
    assert response.status_code == 302
    assert job.params == {
        "source": entry.path,
        "name": "tiny-hf-4bit",
        "dtype": "float16",
        "quantize": True,
        "bits": 4,
        "group_size": 64,
        "recipe": None,
    }
    assert job.title == "Convert tiny-hf to tiny-hf-4bit"
    assert enqueued[0]["queue"] == "models.heavy"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bits": "7", "group_size": "64"}, "Select a valid choice"),
        ({"bits": "4", "group_size": "100"}, "Select a valid choice"),
        ({"bits": "4", "group_size": "64", "recipe": "mixed_3_6"}, "tick Quantize"),
        ({"bits": "4", "group_size": "64", "name": "tiny-hf"}, "already exists"),
        ({"bits": "4", "group_size": "64", "dtype": "int8"}, "Select a valid choice"),
    ],
)
def test_it_explains_bad_input(
    admin_client: Client, entry: LibraryModel, data: dict[str, str], message: str
) -> None:
    response = admin_client.post(_url(entry), data)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert not ModelJob.objects.exists()


def test_it_refuses_a_model_mlx_lm_cannot_load(admin_client: Client, library: Path) -> None:
    odd = library / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "no-such-arch"}')
    entry = services.library_find(ref="odd")

    response = admin_client.post(_url(entry), {"bits": "4", "group_size": "64"})

    assert response.status_code == 400
    assert "mlx-lm cannot load odd" in response.content.decode()


def test_it_shows_the_form(admin_client: Client, entry: LibraryModel) -> None:
    response = admin_client.get(_url(entry))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Convert tiny-hf to MLX" in html and f'action="{_url(entry)}"' in html
    assert "mixed_4_6" in html


def test_it_answers_404_for_an_unknown_model(admin_client: Client, library: Path) -> None:
    url = reverse("models_admin:convert", args=[uuid.uuid4()])
    assert admin_client.get(url).status_code == 404


def test_it_refuses_anonymous_people_and_non_staff(
    client: Client, owner_client: Client, entry: LibraryModel
) -> None:
    assert client.post(_url(entry), {"bits": "4", "group_size": "64"}).status_code == 302
    assert owner_client.post(_url(entry), {"bits": "4", "group_size": "64"}).status_code == 403
    assert not ModelJob.objects.exists()


def test_it_refuses_other_methods(admin_client: Client, entry: LibraryModel) -> None:
    assert admin_client.delete(_url(entry)).status_code == 405
