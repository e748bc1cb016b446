"""models_admin.views.index: the library table, jobs and the pull form."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from inference.models import Generation
from models_admin import services
from models_admin.models import ModelJob

from .conftest import finished_validation
from .test_library_services import write_gguf

pytestmark = pytest.mark.django_db

URL = reverse("models_admin:index")


def test_it_lists_every_model_with_its_facts(
    admin_client: Client, library: Path, tiny_hf_dir: Path
) -> None:
    write_gguf(library / "smol" / "smol.gguf")

    response = admin_client.get(URL)

    assert response.status_code == 200
    html = response.content.decode()
    assert "tiny-hf" in html and "smol/smol.gguf" in html
    assert "LlamaForCausalLM" in html
    assert "2 models on this machine" in html
    assert str(tiny_hf_dir) in html
    assert reverse("models_admin:convert", args=[services.library_find(ref="tiny-hf").code]) in html
    assert 'action="/models/pull/"' in html


def test_it_filters_and_sorts(admin_client: Client, library: Path, tiny_hf_dir: Path) -> None:
    write_gguf(library / "smol" / "smol.gguf")
    Generation.objects.create(model_id="tiny-hf", created_at=timezone.now() - timedelta(hours=2))

    filtered = admin_client.get(URL, {"q": "smol"}).content.decode()
    by_size = admin_client.get(URL, {"sort": "size"}).content.decode()
    by_use = admin_client.get(URL, {"sort": "last_used"}).content.decode()

    assert "smol/smol.gguf" in filtered and "tiny-hf</strong>" not in filtered
    assert by_size.index("tiny-hf</strong>") < by_size.index("smol/smol.gguf</strong>")
    assert by_use.index("tiny-hf</strong>") < by_use.index("smol/smol.gguf</strong>")
    assert "2\xa0hours ago" in by_use


def test_it_shows_recent_jobs_with_live_progress(admin_client: Client, library: Path) -> None:
    job = services.job_create(kind="pull", params={"repo_id": "org/model"})
    ModelJob.objects.filter(pk=job.pk).update(
        state="running",
        done=512,
        total=1024,
        unit="bytes",
        step="downloading 3 files",
        heartbeat_at=timezone.now(),
    )

    html = admin_client.get(URL).content.decode()

    assert f'hx-get="{reverse("models_admin:job_progress", args=[job.code])}"' in html
    assert 'hx-trigger="every 1s"' in html
    assert "50.0%" in html and "downloading 3 files" in html


def test_it_sends_anonymous_people_to_the_login_page(client: Client, library: Path) -> None:
    response = client.get(URL)

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={URL}"


def test_people_who_are_not_staff_see_the_models_and_why_one_is_unavailable(
    owner_client: Client, library: Path, tiny_hf_dir: Path
) -> None:
    response = owner_client.get(URL)

    assert response.status_code == 200
    html = response.content.decode()
    # The configured models, with what they are for; the default one's GGUF is not in this
    # models folder, and the page says so instead of a bare 403.
    assert "smollm2-135m-instruct" in html and "all-minilm-l6-v2" in html
    assert "embeddings" in html and "chat" in html
    assert "its GGUF file is missing from the models folder" in html
    # Read-only: none of the library's actions, paths or jobs.
    assert "<form" not in html.split("<main")[1].split("</main>")[0]
    assert 'action="/models/pull/"' not in html and str(tiny_hf_dir) not in html
    # And the library's actions stay staff-only.
    assert owner_client.post(reverse("models_admin:pull"), {"repo_id": "a/b"}).status_code == 403


def test_it_refuses_other_methods(admin_client: Client, library: Path) -> None:
    assert admin_client.post(URL).status_code == 405


def test_it_shows_unfinished_jobs_and_the_last_few_that_ended(
    admin_client: Client, library: Path
) -> None:
    services.job_create(kind="pull", params={"repo_id": "org/running"})
    ended = [services.job_create(kind="pull", params={"repo_id": f"org/m{i}"}) for i in range(7)]
    ModelJob.objects.filter(pk__in=[j.pk for j in ended]).update(state="succeeded")

    html = admin_client.get(URL).content.decode()

    assert "Pull org/running" in html
    assert html.count("Succeeded</span>") == 5


def test_it_offers_the_import_card(admin_client: Client, library: Path) -> None:
    write_gguf(library / "smol" / "smol.gguf")

    html = admin_client.get(URL).content.decode()

    import_url = reverse("models_admin:import_gguf")
    assert f'action="{import_url}" enctype="multipart/form-data"' in html
    assert 'name="path"' in html and 'name="upload"' in html and 'name="bits"' in html
    assert f'href="{import_url}?path={library / "smol" / "smol.gguf"}"' in html


def test_it_shows_a_quality_card_and_validate_on_models_made_here(
    admin_client: Client, library: Path, tiny_model_dir: Path
) -> None:
    import shutil

    shutil.copytree(tiny_model_dir, library / "made-here")
    (library / "made-here" / services.SOURCE_RECORD).write_text('{"kind": "hf", "path": "/x"}')
    shutil.copytree(tiny_model_dir, library / "pulled")
    made_here = services.library_find(ref="made-here")
    finished_validation(made_here.path)

    html = admin_client.get(URL).content.decode()

    assert reverse("models_admin:validate", args=[made_here.code]) in html
    pulled = services.library_find(ref="pulled")
    assert reverse("models_admin:validate", args=[pulled.code]) not in html
    assert html.count('class="quality-card"') == 1
    assert '<strong class="agreement">97%</strong> tokens agree' in html
    assert "perplexity <strong>12.50</strong> vs 12.25" in html and "(+2.0%)" in html
    assert "<strong>42.5</strong> tok/s" in html and "76.3\xa0MB" in html
    assert "validated 0\xa0minutes ago" in html


def test_it_hides_a_validation_older_than_the_model(
    admin_client: Client, library: Path, tiny_model_dir: Path
) -> None:
    import shutil

    shutil.copytree(tiny_model_dir, library / "remade")
    entry = services.library_find(ref="remade")
    job = finished_validation(entry.path)
    ModelJob.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(days=1))

    html = admin_client.get(URL).content.decode()

    assert 'class="quality-card"' not in html
