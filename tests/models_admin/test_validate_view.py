"""models_admin.views.validate: the Validate form for one library model, starting the job."""

from __future__ import annotations

import json
import shutil
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
def entry(library: Path, tiny_model_dir: Path) -> LibraryModel:
    """An MLX model imported here (as its source record says) from a GGUF in the library."""
    (library / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    shutil.copytree(tiny_model_dir, library / "tiny")
    record = {"kind": "gguf", "path": str(library / "tiny.gguf")}
    (library / "tiny" / services.SOURCE_RECORD).write_text(json.dumps(record))
    return services.library_find(ref="tiny")


def _url(entry: LibraryModel) -> str:
    return reverse("models_admin:validate", args=[entry.code])


def test_it_starts_a_validation(
    admin_client: Client,
    entry: LibraryModel,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(_url(entry), {"n_tokens": "16"})

    job = ModelJob.objects.get()
    assert response.status_code == 302
    assert job.kind == "validate" and job.params == {"source": entry.path, "n_tokens": 16}
    assert job.title == "Validate tiny"
    assert enqueued[0]["queue"] == "models.heavy"


def test_it_shows_the_form_and_what_it_compares_with(
    admin_client: Client, entry: LibraryModel, library: Path
) -> None:
    response = admin_client.get(_url(entry))

    html = response.content.decode()
    assert response.status_code == 200
    assert f'action="{_url(entry)}"' in html and 'name="n_tokens"' in html
    assert "the GGUF it was imported from, dequantized" in html
    assert str(library / "tiny.gguf") in html


@pytest.mark.parametrize(
    ("data", "message"),
    [({"n_tokens": "0"}, "greater than or equal to 1"), ({"n_tokens": "x"}, "Enter a whole")],
)
def test_it_explains_bad_input(
    admin_client: Client, entry: LibraryModel, data: dict[str, str], message: str
) -> None:
    response = admin_client.post(_url(entry), data)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert not ModelJob.objects.exists()


def test_it_refuses_a_model_that_was_not_made_here(
    admin_client: Client, library: Path, tiny_model_dir: Path
) -> None:
    shutil.copytree(tiny_model_dir, library / "pulled")
    entry = services.library_find(ref="pulled")

    response = admin_client.post(_url(entry), {"n_tokens": "32"})

    assert response.status_code == 400
    assert "there is no record of its source" in response.content.decode()


def test_it_refuses_a_model_that_is_not_mlx(admin_client: Client, tiny_hf_dir: Path) -> None:
    entry = services.library_find(ref="tiny-hf")

    response = admin_client.post(_url(entry), {"n_tokens": "32"})

    assert response.status_code == 400
    assert "tiny-hf is not an MLX model." in response.content.decode()


def test_it_answers_404_for_an_unknown_model(admin_client: Client, library: Path) -> None:
    url = reverse("models_admin:validate", args=[uuid.uuid4()])
    assert admin_client.get(url).status_code == 404


def test_it_refuses_anonymous_people_and_non_staff(
    client: Client, owner_client: Client, entry: LibraryModel
) -> None:
    assert client.post(_url(entry), {"n_tokens": "32"}).status_code == 302
    assert owner_client.post(_url(entry), {"n_tokens": "32"}).status_code == 403
    assert not ModelJob.objects.exists()


def test_it_refuses_other_methods(admin_client: Client, entry: LibraryModel) -> None:
    assert admin_client.delete(_url(entry)).status_code == 405
