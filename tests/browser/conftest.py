"""A live mlxweb (SQLite, in-process worker, the tiny model) and Debian's chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.browser import tiny_site
from tests.support.live import Site

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
    # The privacy test signs up a second person; sign-up is closed by default.
    with tiny_site(
        tmp_path_factory.mktemp("site"), tiny_model_dir, MLXWEB_ALLOW_SIGNUP="true"
    ) as site:
        yield site


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
