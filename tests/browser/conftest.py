"""A live mlxweb (SQLite, in-process worker, the tiny model) and Debian's chromium."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live import Site, write_configs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def live_site(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    configs = write_configs(root / "configs", model_id="tiny", model_dir="tiny")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_CONFIG_DIR": str(configs),
        "MLXWEB_MODELS_DIR": str(models),
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
        "MLXWEB_SECRET_KEY": "browser-test",
        # The privacy test signs up a second person; sign-up is closed by default.
        "MLXWEB_ALLOW_SIGNUP": "true",
        "PYTHONUNBUFFERED": "1",
    }
    site = Site(env=env, log_dir=root)
    site.manage("migrate", "--noinput", "-v0")
    site.serve()
    yield site
    site.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the browser tests need Debian's chromium at {CHROMIUM} (scripts/test installs it)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # scripts/test preloads OpenBLAS for MLX; chromium must not inherit that.
        env: dict[str, str | float | bool] = {
            k: v for k, v in os.environ.items() if k != "LD_PRELOAD"
        }
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, env=env)
        yield browser
        browser.close()
