"""A GGUF built to break the metadata reader (arrays nested a thousand deep, 12 kB) in the models
folder: the Models page lists it as a row with its error, and importing it fails cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from models_admin import services
from models_admin.models import LibraryModel, ModelJob
from tests.inference.weights.test_gguf_reader import nested_arrays

pytestmark = pytest.mark.django_db


def test_the_models_page_shows_a_hostile_gguf_as_a_row_with_its_error(
    admin_client: Client, library: Path, tiny_hf_dir: Path
) -> None:
    (library / "evil.gguf").write_bytes(nested_arrays(1000))

    response = admin_client.get(reverse("models_admin:index"))
    again = admin_client.get(reverse("models_admin:index"))

    assert response.status_code == again.status_code == 200
    html = response.content.decode()
    assert "evil.gguf" in html and "tiny-hf" in html
    row = LibraryModel.objects.get(path=str(library / "evil.gguf"))
    assert row.loadable is False
    assert "nests arrays" in row.load_problem
    assert "nests arrays" in html


def test_importing_a_hostile_gguf_fails_with_a_clear_error(library: Path) -> None:
    evil = library / "evil.gguf"
    evil.write_bytes(nested_arrays(1000))

    job = services.job_create(
        kind="import_gguf", params={"source": str(evil), "name": "evil"}, enqueue=False
    )
    job = services.job_run(job=job)

    assert job.state == ModelJob.State.FAILED
    assert "nests arrays" in job.error
    assert not (library / "evil").exists()
