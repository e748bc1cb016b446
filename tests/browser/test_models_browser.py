"""What the admin sees in chromium on the Models page: import a GGUF while its progress bar
moves, chat with the imported model, validate it and read its quality card."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from models_admin.progress import FLUSH_INTERVAL_SECONDS
from tests.support.browser import signed_up_page, tiny_site
from tests.support.live import Site
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(400)]

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
    (root / "models" / "smollm2").mkdir(parents=True)
    (root / "models" / "smollm2" / smollm2_gguf.name).symlink_to(smollm2_gguf)
    import_dirs = str(smollm2_gguf.resolve().parent)
    with tiny_site(root, tiny_model_dir, MLXWEB_IMPORT_DIRS=import_dirs) as site:
        yield site


@pytest.fixture(scope="module")
def admin_page(browser: Any, models_site: Site) -> Iterator[Page]:
    viewport = {"width": 1400, "height": 1000}
    with signed_up_page(browser, models_site.url, "ada", viewport=viewport) as page:
        yield page


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


def _job_worker_pid(site: Site) -> int:
    """The site's job worker: the Celery process `manage.py serve` started as its child."""
    web = site.processes["web"].pid

    def find() -> int | None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                command = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == web and b"celery" in command and b"worker" in command:
                return int(proc.name)
        return None

    return wait_until(find, timeout=60, what="the site's job worker")


def _job_row(site: Site, code: str) -> tuple[str, int, int, str]:
    """(state, done, total, heartbeat) of a job, read from the site's database."""
    path = site.env["MLXWEB_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute(
            "SELECT state, done, total, heartbeat_at FROM models_admin_modeljob WHERE code = ?",
            [code.replace("-", "")],
        ).fetchone()
    assert row is not None, f"no job {code}"
    return str(row[0]), int(row[1] or 0), int(row[2] or 0), str(row[3])


def _shows(state: tuple[str, ...] | None, row: tuple[str, int, int, str]) -> bool:
    """Whether the bar as the page shows it (BAR_STATE) is the job row's."""
    if state is None or state[3].lower() != row[0]:
        return False
    width, percent = state[0], state[1]
    if not row[2]:
        return (width, percent) == ("100%", "")  # no total yet: the bar is full, moving
    expected = 100.0 * row[1] / row[2]
    try:
        shown = [float(text.removesuffix("%")) for text in (width, percent)]
    except ValueError:
        return False
    return all(abs(value - expected) <= 0.051 for value in shown)


def _step_job(page: Page, site: Site, worker: int, code: str) -> list[tuple[str, str, str, str]]:
    """Let the stopped job worker run in short slices until the page has shown the bar at a
    place short of 100%; the states shown, in order.

    The job's monitor copies its progress onto the row once a second (wall-clock). The worker
    stays stopped until that copy is due, then runs a 0.03 s slice, in which the monitor
    copies where the job stands; stopped again, the row holds still until the page shows it.
    So the page sees the job every 0.03 s of its work, on a fast machine or a loaded one,
    instead of whatever one-second samples happen to fall in a one-second import. (With 0.1 s
    slices a quick run read all 272 of SmolLM2's tensors inside one slice.)
    """
    seen: list[tuple[str, str, str, str]] = []
    heartbeat = ""
    copied = time.monotonic()
    deadline = copied + 180
    while time.monotonic() < deadline:
        time.sleep(max(0.0, copied + FLUSH_INTERVAL_SECONDS - time.monotonic()))
        os.kill(worker, signal.SIGCONT)
        time.sleep(0.03)  # the worker's slice
        os.kill(worker, signal.SIGSTOP)
        row = _job_row(site, code)
        if row[3] == heartbeat:
            continue  # the monitor did not get to copy in that slice: another one
        heartbeat, copied = row[3], time.monotonic()

        def shown(row: tuple[str, int, int, str] = row) -> tuple[str, str, str, str] | None:
            state = _bar(page)
            return state if _shows(state, row) else None

        try:
            state = wait_until(shown, timeout=5, what=f"the page to show the job at {row}")
        except AssertionError:
            # The worker may have stopped in the middle of a write the page's request waits
            # for: let it run on and look again.
            heartbeat = ""
            continue
        if not seen or state != seen[-1]:
            seen.append(state)
        state_name, done, total, _ = row
        # Still queued (the worker has not taken it up in its slices yet): another slice.
        if state_name not in ("queued", "running") or (total and done < total):
            break
    return seen


def _bar(page: Page) -> tuple[str, str, str, str] | None:
    try:
        state = page.evaluate(BAR_STATE)
    except PlaywrightError:  # the page is reloading
        return None
    return tuple(state) if state is not None else None


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
    # The job worker runs only in slices the test gives it (SIGSTOP / SIGCONT), so the page
    # sees the import part-way however fast the machine is.
    worker = _job_worker_pid(models_site)
    os.kill(worker, signal.SIGSTOP)
    try:
        card.locator("button[type=submit]").click()
        page.wait_for_url(re.compile(r"/models/jobs/[0-9a-f-]{36}/$"))
        expect(page.locator("h1")).to_have_text(f"Import {smollm2_gguf.name} as {IMPORTED}")
        code = page.url.rstrip("/").rsplit("/", 1)[1]
        stepped = _step_job(page, models_site, worker, code)
    finally:
        os.kill(worker, signal.SIGCONT)

    seen = stepped + _watch_job(page, timeout_s=180)

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
