"""The real embedding model (all-MiniLM-L6-v2), fetched once by the app's own fetch code."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings as django_settings

from inference.services import model_fetch
from inference.weights.fetch import FetchError

MINILM_ID = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's sentence-transformers folder in var/models (`scripts/test` fetches it
    with the default model; fetching again is a no-op then)."""
    model = django_settings.MLXWEB_CONFIG.models[MINILM_ID]
    try:
        path = model_fetch(model=model, models_dir=django_settings.MLXWEB_MODELS_DIR)
    except FetchError as e:
        pytest.fail(f"the embedding model could not be fetched: {e}")
    assert path is not None
    return path


@pytest.fixture
def minilm_models_root(models_root: Path, minilm_dir: Path) -> Path:
    """A temporary models root holding the embedding model where its config expects it."""
    (models_root / MINILM_ID).symlink_to(minilm_dir)
    return models_root
