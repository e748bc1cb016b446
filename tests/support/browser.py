"""What the browser tests share: a live site on the tiny model, and a person signed up in
chromium through the sign-up form."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from tests.support.live import Site, write_configs

PASSWORD = "a-long-pass-phrase"


@contextmanager
def tiny_site(root: Path, tiny_model_dir: Path, **env: str) -> Iterator[Site]:
    """A live mlxweb in `root` (SQLite, in-process worker) serving the tiny model, migrated and
    up until the block ends. `env` adds or overrides its environment (MLXWEB_ALLOW_SIGNUP, ...);
    a test that needs more in its models or configs folder puts it there first (both are
    `root/models` and `root/configs`)."""
    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    configs = write_configs(root / "configs", model_id="tiny", model_dir="tiny")
    site = Site(
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
            "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
            "MLXWEB_CONFIG_DIR": str(configs),
            "MLXWEB_MODELS_DIR": str(models),
            "MLXWEB_VAR_DIR": str(root / "var"),
            "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
            "MLXWEB_SECRET_KEY": "browser-test",
            "PYTHONUNBUFFERED": "1",
            **env,
        },
        log_dir=root,
    )
    site.manage("migrate", "--noinput", "-v0")
    site.serve()
    try:
        yield site
    finally:
        site.stop_all()


def sign_up(page: Page, base_url: str, username: str) -> None:
    """Sign `username` up through the form (the first person is the admin) and wait for the
    new-chat page it lands on."""
    page.goto(base_url + "/signup/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password1]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("#composer")).to_be_visible()
    # The page's scripts are deferred (Enter sends, the socket): before they run, Enter types a
    # new line. The likely cause of a full run's 120 s wait for a new chat after Enter.
    page.wait_for_load_state("load")


@contextmanager
def signed_up_page(browser: Any, base_url: str, username: str, **context: Any) -> Iterator[Page]:
    """A page in a new browser context (`context`: its options) with `username` signed up; the
    context closes when the block ends."""
    browser_context = browser.new_context(**context)
    page = browser_context.new_page()
    sign_up(page, base_url, username)
    try:
        yield page
    finally:
        browser_context.close()
