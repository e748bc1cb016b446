"""models_admin.views.export_gguf: the GGUF export form for one library model, starting the job."""

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
    return reverse("models_admin:export_gguf", args=[entry.code])


def test_it_starts_an_export_with_a_made_up_file_name(
    admin_client: Client,
    library: Path,
    entry: LibraryModel,
    enqueued: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(_url(entry), {"file_type": "q4_0"})

    job = ModelJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("models_admin:job_detail", args=[job.code])
    assert job.params == {
        "source": entry.path,
        "path": str(library / "tiny-hf-Q4_0.gguf"),
        "file_type": "q4_0",
    }
    assert job.title == "Export tiny-hf to GGUF as tiny-hf-Q4_0.gguf (Q4_0)"
    assert enqueued[0]["queue"] == "models.heavy"


def test_it_takes_a_file_name(admin_client: Client, library: Path, entry: LibraryModel) -> None:
    admin_client.post(_url(entry), {"file_type": "f16", "path": "exports/mine.gguf"})

    assert ModelJob.objects.get().params["path"] == str(library / "exports" / "mine.gguf")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"file_type": "q5_k"}, "Select a valid choice"),
        ({"file_type": "q8_0", "path": "/etc/passwd.gguf"}, "an export goes into the models"),
        ({"file_type": "q8_0", "path": "mine.bin"}, "must end in .gguf"),
        ({"file_type": "q8_0", "path": "tiny-hf/mine.gguf"}, "tiny-hf is a model folder"),
    ],
)
def test_it_explains_bad_input(
    admin_client: Client, entry: LibraryModel, data: dict[str, str], message: str
) -> None:
    response = admin_client.post(_url(entry), data)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert not ModelJob.objects.exists()


def test_it_refuses_an_existing_file(
    admin_client: Client, library: Path, entry: LibraryModel
) -> None:
    (library / "tiny-hf-Q8_0.gguf").write_bytes(b"GGUF")

    response = admin_client.post(_url(entry), {"file_type": "q8_0"})

    assert response.status_code == 400
    assert "a file of that name already exists" in response.content.decode()


def test_it_refuses_an_architecture_it_cannot_export(
    admin_client: Client, library: Path
) -> None:
    odd = library / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "no-such-arch"}')
    entry = services.library_find(ref="odd")

    response = admin_client.post(_url(entry), {"file_type": "q8_0"})

    assert response.status_code == 400
    assert "mlx-lm cannot load odd" in response.content.decode()


def test_it_shows_the_form_and_the_page_links_to_it(
    admin_client: Client, entry: LibraryModel
) -> None:
    response = admin_client.get(_url(entry))
    index = admin_client.get(reverse("models_admin:index")).content.decode()

    assert response.status_code == 200
    html = response.content.decode()
    assert "Export tiny-hf to GGUF" in html and f'action="{_url(entry)}"' in html
    assert 'value="tiny-hf-Q8_0.gguf"' in html
    assert f'href="{_url(entry)}"' in index


def test_the_page_offers_no_export_of_a_gguf_file(
    admin_client: Client, library: Path, smollm2_gguf: Path
) -> None:
    from tests.support.gguf_imports import place

    place(smollm2_gguf, library / "gguf")
    entry = services.library_find(ref="gguf/SmolLM2-135M-Instruct.Q4_1.gguf")

    index = admin_client.get(reverse("models_admin:index")).content.decode()
    response = admin_client.post(_url(entry), {"file_type": "q8_0"})

    assert f'href="{_url(entry)}"' not in index
    assert response.status_code == 400
    assert "is a GGUF file already" in response.content.decode()


def test_it_answers_404_for_an_unknown_model(admin_client: Client, library: Path) -> None:
    url = reverse("models_admin:export_gguf", args=[uuid.uuid4()])
    assert admin_client.get(url).status_code == 404


def test_it_refuses_anonymous_people_and_non_staff(
    client: Client, owner_client: Client, entry: LibraryModel
) -> None:
    assert client.post(_url(entry), {"file_type": "q8_0"}).status_code == 302
    assert owner_client.post(_url(entry), {"file_type": "q8_0"}).status_code == 403
    assert not ModelJob.objects.exists()


def test_it_refuses_other_methods(admin_client: Client, entry: LibraryModel) -> None:
    assert admin_client.delete(_url(entry)).status_code == 405
