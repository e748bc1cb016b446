"""The library and its jobs in Django's admin: listed, searchable, read-only."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from models_admin import services

pytestmark = pytest.mark.django_db


def test_it_lists_the_library_and_the_jobs(
    admin_client: Client, library: Path, tiny_hf_dir: Path
) -> None:
    services.library_scan()
    job = services.job_create(kind="pull", params={"repo_id": "org/model"})

    models_page = admin_client.get(reverse("admin:models_admin_librarymodel_changelist"))
    jobs_page = admin_client.get(reverse("admin:models_admin_modeljob_changelist"))

    assert models_page.status_code == 200 and "tiny-hf" in models_page.content.decode()
    assert jobs_page.status_code == 200 and job.title in jobs_page.content.decode()
    assert admin_client.get(reverse("admin:models_admin_modeljob_add")).status_code == 403
