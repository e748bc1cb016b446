"""Search, export and import in chromium (issue 9): the sidebar's search finds a message as you
type and opens the conversation at it (keyboard only); a JSON export downloads and imports back
as a new conversation; a bad file is refused with its reason. The tiny model answers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import sign_up

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

REPLY_TIMEOUT = 120_000


def _shots() -> Path:
    folder = Path(os.environ.get("MLXWEB_SCREENSHOTS") or "/tmp/mlxweb-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(browser, live_site):  # type: ignore[no-untyped-def]
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.csp_violations = []  # type: ignore[attr-defined]
    page.on(
        "console",
        lambda m: "Content Security Policy" in m.text and page.csp_violations.append(m.text),  # type: ignore[attr-defined]
    )
    sign_up(page, live_site.url, "linnea")
    page.click("details.options summary")
    page.fill("input[name=max_tokens]", "8")
    box = page.locator("textarea[name=text]")
    box.fill("Tell me about zebras and their stripes")
    box.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"), timeout=REPLY_TIMEOUT)
    # The reply has ended when its final render (with its actions) replaces the stream.
    expect(page.locator("article.assistant button.regenerate")).to_have_count(
        1, timeout=REPLY_TIMEOUT
    )
    yield page
    context.close()


def test_search_as_you_type_opens_the_conversation_at_the_message(page: Page) -> None:
    conversation_url = page.url
    message_id = page.locator("article.user").first.get_attribute("id")
    assert message_id and message_id.startswith("message-")
    page.goto(page.url.split("/c/")[0] + "/")  # another page: the new-chat one
    search = page.locator("#sidebar-search")
    search.click()
    search.press_sequentially("zebr")
    # The results of the whole word typed (earlier letters' results come and go as you type).
    expect(page.locator("#search-results .search-count")).to_contain_text("for “zebr”")
    hit = page.locator("#search-results .message-hit a").first
    expect(hit).to_be_visible()
    expect(hit.locator("mark")).to_have_text(re.compile("zebras", re.IGNORECASE))
    page.screenshot(path=str(_shots() / "search-1280.png"))
    # Title hits come first (the title may be the first message, or one the model made up).
    for _ in range(page.locator("#search-results .title-hit a").count() + 1):
        page.keyboard.press("ArrowDown")
    expect(hit).to_be_focused()
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(re.escape(conversation_url) + r"\?m=[0-9a-f-]{36}#message-"))
    assert page.url.endswith("#" + message_id)
    expect(page.locator(f"#{message_id}")).to_be_visible()

    # Esc closes the results and returns to the box.
    search = page.locator("#sidebar-search")
    search.fill("stripes")
    expect(page.locator("#search-results .search-count")).to_contain_text("for “stripes”")
    search.press("Escape")
    expect(page.locator("#search-results .search-hit")).to_have_count(0)
    expect(search).to_be_focused()


def test_a_json_export_imports_back_as_a_new_conversation(
    page: Page, live_site, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    page.locator("#sidebar .conversations a").first.click()
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    with page.expect_download() as download:
        page.locator("#thread-header a.export", has_text="JSON").click()
    saved = tmp_path / "export.json"
    download.value.save_as(saved)
    document = json.loads(saved.read_text())
    assert document["conversation"]["messages"][0]["content"].startswith("Tell me about zebras")

    page.locator("#sidebar a", has_text="Export or import").click()
    expect(page.locator("h1")).to_have_text("Export and import")
    page.set_input_files("input[type=file]", str(saved))
    page.click(".import-form button[type=submit]")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    expect(page.locator(".flash")).to_contain_text("Imported 1 conversation.")
    expect(page.locator("article.user").first).to_contain_text("Tell me about zebras")
    expect(page.locator("article.assistant")).to_have_count(1)
    expect(page.locator("#sidebar .conversations li")).to_have_count(2)

    # At phone width the page holds without sideways scrolling.
    page.set_viewport_size({"width": 390, "height": 800})
    page.locator("#thread-header a.export").first.wait_for()
    page.goto(live_site.url + "/import/")
    page.screenshot(path=str(_shots() / "import-390.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.set_viewport_size({"width": 1280, "height": 800})

    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": "world"}')
    page.goto(live_site.url + "/import/")
    page.set_input_files("input[type=file]", str(bad))
    page.click(".import-form button[type=submit]")
    expect(page.locator("#import-errors")).to_contain_text("neither an mlxweb export")
    page.goto(live_site.url + "/")
    expect(page.locator("#sidebar .conversations li")).to_have_count(2)
    assert page.csp_violations == []  # type: ignore[attr-defined]
