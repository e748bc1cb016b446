"""models_admin.views.quantize: the quantize form for an MLX model, starting the job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from models_admin import services
from models_admin.models import LibraryModel, ModelJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def mlx_8bit(library: Path, tiny_hf_dir: Path) -> LibraryModel:
    """An MLX model as far as the library can tell: mlx's safetensors header, 8-bit config."""
    path = library / "tiny-8bit"
    path.mkdir()
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config["quantization"] = {"bits": 8, "group_size": 64}
    (path / "config.json").write_text(json.dumps(config))
    header = json.dumps({"__metadata__": {"format": "mlx"}}).encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return services.library_find(ref="tiny-8bit")


def _url(entry: LibraryModel) -> str:
    return reverse("models_admin:quantize", args=[entry.code])


def test_it_starts_a_quantization(
    admin_client: Client,
    mlx_8bit: LibraryModel,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(_url(mlx_8bit), {"bits": "4", "group_size": "32"})

    job = ModelJob.objects.get()
    assert response.status_code == 302
    assert job.params == {
        "source": mlx_8bit.path,
        "name": "tiny-4bit",
        "bits": 4,
        "group_size": 32,
        "recipe": None,
    }
    assert enqueued[0]["queue"] == "models.heavy"


def test_it_refuses_as_many_bits_as_the_model_has(
    admin_client: Client, mlx_8bit: LibraryModel
) -> None:
    response = admin_client.post(_url(mlx_8bit), {"bits": "8", "group_size": "64"})

    assert response.status_code == 400
    assert "tiny-8bit is 8-bit already: choose fewer bits." in response.content.decode()


def test_it_refuses_a_model_that_is_not_mlx(
    admin_client: Client, library: Path, tiny_hf_dir: Path
) -> None:
    entry = services.library_find(ref="tiny-hf")

    response = admin_client.post(_url(entry), {"bits": "4", "group_size": "64"})

    assert response.status_code == 400
    assert "is not an MLX model: convert it instead" in response.content.decode()


def test_it_shows_the_form(admin_client: Client, mlx_8bit: LibraryModel) -> None:
    response = admin_client.get(_url(mlx_8bit))

    assert response.status_code == 200
    assert "Quantize tiny-8bit" in response.content.decode()


def test_it_refuses_anonymous_people_and_non_staff(
    client: Client, owner_client: Client, mlx_8bit: LibraryModel
) -> None:
    assert client.get(_url(mlx_8bit)).status_code == 302
    assert owner_client.post(_url(mlx_8bit), {"bits": "4"}).status_code == 403


def test_it_refuses_other_methods(admin_client: Client, mlx_8bit: LibraryModel) -> None:
    assert admin_client.patch(_url(mlx_8bit)).status_code == 405
