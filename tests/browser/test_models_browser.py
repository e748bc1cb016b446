"""What the admin sees in chromium on the Models page: import a GGUF while its progress bar
moves, chat with the imported model, validate it and read its quality card."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from tests.support.live import Site, write_configs

pytestmark = [pytest.mark.browser, pytest.mark.timeout(400)]

PASSWORD = "a-long-pass-phrase"
IMPORTED = "smollm2-imported"
PARIS = "What is the capital of France? Answer briefly."

# The job's progress as the page shows it: the bar's width, the percent, the step, the state.
BAR_STATE = """() => {
  const job = document.querySelector('section.job-progress');
  if (!job) return null;
  const fill = job.querySelector('.bar .fill');
  const percent = job.querySelector('.percent');
  const step = job.querySelector('.step');
  const badge = job.querySelector('.job-head .badge');
  return [fill ? fill.style.width : '', percent ? percent.textContent : '',
          step ? step.textContent : '', badge ? badge.textContent : ''];
}"""


@pytest.fixture(scope="module")
def models_site(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, smollm2_gguf: Path
) -> Iterator[Site]:
    """A live site on the tiny model whose models folder also links to the SmolLM2 GGUF; the
    link's real folder is a configured import folder, so the library may read through it."""
    root = tmp_path_factory.mktemp("models-site")
    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    (models / "smollm2").mkdir()
    (models / "smollm2" / smollm2_gguf.name).symlink_to(smollm2_gguf)
    configs = write_configs(root / "configs", model_id="tiny", model_dir="tiny")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_CONFIG_DIR": str(configs),
        "MLXWEB_MODELS_DIR": str(models),
        "MLXWEB_IMPORT_DIRS": str(smollm2_gguf.resolve().parent),
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
        "MLXWEB_SECRET_KEY": "browser-test",
        "PYTHONUNBUFFERED": "1",
    }
    site = Site(env=env, log_dir=root)
    site.manage("migrate", "--noinput", "-v0")
    site.serve()
    yield site
    site.stop_all()


@pytest.fixture(scope="module")
def admin_page(browser: Any, models_site: Site) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(models_site.url + "/signup/")
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password1]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("#composer")).to_be_visible()
    yield page
    context.close()


def _watch_job(page: Page, timeout_s: float) -> list[tuple[str, str, str, str]]:
    """Sample the job's bar until the job ends: the distinct states seen, in order.

    Reads the page with one script per sample instead of waiting on elements, since htmx swaps
    the whole job section every second (and reloads the page when the job ends).
    """
    seen: list[tuple[str, str, str, str]] = []
    for _ in range(int(timeout_s / 0.05)):
        try:
            state = page.evaluate(BAR_STATE)
        except PlaywrightError:  # the page is reloading
            page.wait_for_load_state()
            continue
        if state is not None and (not seen or tuple(state) != seen[-1]):
            seen.append(tuple(state))
        if state is not None and state[3] in {"Succeeded", "Failed", "Cancelled"}:
            break
        page.wait_for_timeout(50)
    return seen


def test_it_imports_a_gguf_with_a_moving_progress_bar(
    admin_page: Page, models_site: Site, smollm2_gguf: Path
) -> None:
    page = admin_page
    page.click(".topbar >> text=Models")
    card = page.locator("section.import-card")
    expect(card).to_contain_text("Import a GGUF")
    link = Path(models_site.env["MLXWEB_MODELS_DIR"]) / "smollm2" / smollm2_gguf.name
    card.locator("input[name=path]").fill(str(link))
    expect(card.locator("select[name=bits]")).to_have_value("keep")
    card.locator("input[name=name]").fill(IMPORTED)
    card.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/models/jobs/[0-9a-f-]{36}/$"))
    expect(page.locator("h1")).to_have_text(f"Import {smollm2_gguf.name} as {IMPORTED}")

    seen = _watch_job(page, timeout_s=180)

    widths = [width for width, *_ in seen]
    percents = [percent for _, percent, _, _ in seen]
    changes = sum(1 for a, b in zip(seen, seen[1:], strict=False) if a[:2] != b[:2])
    assert changes >= 2, f"the bar did not move twice: {seen}"
    assert seen[-1][3] == "Succeeded", seen
    assert widths[-1] == "100%" and percents[-1] == "100.0%", seen
    assert any(state[3] == "Running" for state in seen), seen
    # The page reloaded itself when the job ended: the outcome is there.
    expect(page.locator(".job-facts")).to_contain_text("stored=kept 210 Q4_1, 1 Q8_0")


def test_it_chats_with_the_imported_model(admin_page: Page, models_site: Site) -> None:
    page = admin_page
    page.goto(models_site.url + "/")
    picker = page.locator("select[name=model]")
    expect(picker.locator(f"option[value={IMPORTED}]")).to_have_count(1)
    picker.select_option(IMPORTED)
    page.click("details.options summary")
    page.fill("input[name=temperature]", "0")
    page.fill("input[name=max_tokens]", "24")
    box = page.locator("textarea[name=text]")
    box.fill(PARIS)
    box.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))

    reply = page.locator("article.assistant").last
    expect(reply.locator(".body.md")).to_contain_text("Paris", timeout=180_000)


@pytest.mark.slow
def test_it_validates_the_imported_model_and_shows_its_quality_card(
    admin_page: Page, models_site: Site, tmp_path: Path
) -> None:
    page = admin_page
    page.goto(models_site.url + "/models/")
    row = page.locator("table.library tr", has_text=IMPORTED).first
    row.locator("text=Validate").click()
    expect(page.locator("h1")).to_have_text(f"Validate {IMPORTED}")
    expect(page.locator(".card")).to_contain_text("the GGUF it was imported from, dequantized")
    page.fill("input[name=n_tokens]", "4")
    page.click("form.job-form button[type=submit]")
    page.wait_for_url(re.compile(r"/models/jobs/[0-9a-f-]{36}/$"))

    seen = _watch_job(page, timeout_s=300)

    assert seen and seen[-1][3] == "Succeeded", seen
    card = page.locator(".validation .quality-card")
    expect(card).to_contain_text("tokens agree")
    expect(page.locator("table.answers")).to_contain_text(PARIS)
    page.screenshot(path=str(tmp_path / "validation.png"), full_page=True)
    page.goto(models_site.url + "/models/")
    quality = page.locator("tr.quality-row .quality-card")
    expect(quality).to_have_count(1)
    expect(quality.locator(".agreement")).to_have_text("100%")
    expect(quality).to_contain_text("perplexity")
    expect(quality).to_contain_text("validated")
    page.screenshot(path=str(tmp_path / "models-page.png"), full_page=True)
