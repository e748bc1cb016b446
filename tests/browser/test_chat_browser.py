"""What a person sees in chromium: sign up, chat, watch tokens stream, stop, reload, privacy."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import sign_up, signed_up_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def _start_chat(page: Page, text: str, max_tokens: int | None = None) -> None:
    """From the new-chat page: send the first message, land on the conversation."""
    if max_tokens is not None:
        page.click("details.options summary")
        page.fill("input[name=max_tokens]", str(max_tokens))
    box = page.locator("textarea[name=text]")
    box.fill(text)
    box.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))


def _send(page: Page, text: str, max_tokens: int | None = None) -> None:
    if max_tokens is not None:
        if not page.locator("input[name=max_tokens]").is_visible():
            page.click("details.options summary")
        page.fill("input[name=max_tokens]", str(max_tokens))
    box = page.locator("textarea[name=text]")
    box.fill(text)
    box.press("Enter")


@pytest.fixture(scope="module")
def first_user_page(browser, live_site):  # type: ignore[no-untyped-def]
    with signed_up_page(browser, live_site.url, "ada") as page:
        yield page


def test_it_signs_up_the_first_user_as_admin(first_user_page: Page, live_site) -> None:
    expect(first_user_page.locator("select[name=model]")).to_have_value("tiny")
    first_user_page.click(".topbar >> text=Models")
    expect(first_user_page.locator("main")).to_contain_text("Pull from the Hugging Face hub")
    first_user_page.goto(live_site.url + "/")


def test_it_streams_a_reply_token_by_token(first_user_page: Page, live_site) -> None:
    page = first_user_page
    page.goto(live_site.url + "/")
    _start_chat(page, "Hello, who are you?")
    expect(page.locator("article.user").last).to_contain_text("Hello, who are you?")
    # The session's first reply loads the model too: as long as the later waits on a loaded CI
    # machine (60 s once ran out there).
    expect(page.locator("article.assistant .body.md")).to_have_count(1, timeout=120_000)
    # Record every length the streamed text takes, as the page changes: a sample taken now and
    # then can miss the steps on a loaded machine.
    page.evaluate(
        """() => {
            window.streamedLengths = [];
            new MutationObserver(() => {
                const e = [...document.querySelectorAll('article.assistant .streaming')].pop();
                if (e) window.streamedLengths.push(e.textContent.length);
            }).observe(document.body, {childList: true, subtree: true, characterData: true});
        }"""
    )
    _send(page, "Tell me more", max_tokens=400)

    expect(page.locator("article.assistant .streaming").last).to_be_visible(timeout=30_000)
    expect(page.locator("article.assistant .body.md")).to_have_count(2, timeout=120_000)
    lengths = set(page.evaluate("() => window.streamedLengths"))
    assert len(lengths - {0}) >= 3, f"the text did not grow in steps: {sorted(lengths)}"

    final = page.locator("article.assistant").last
    expect(final.locator(".body.md")).to_be_visible(timeout=60_000)
    expect(final.locator(".meta")).to_contain_text("tokens")
    expect(final.locator(".meta")).to_contain_text("TTFT")
    expect(page.locator("textarea[name=text]")).to_have_value("")


def test_it_stops_a_reply_and_keeps_the_text(first_user_page: Page, live_site) -> None:
    page = first_user_page
    page.goto(live_site.url + "/")
    _start_chat(page, "Write a very long story", max_tokens=2000)
    streaming = page.locator("article.assistant .streaming").last
    expect(streaming).not_to_be_empty(timeout=30_000)
    # Once text arrives the reply says it is being written, no longer that it waits.
    expect(page.locator("article.assistant form.stop .status:visible")).to_have_text("Writing…")
    page.locator("article.assistant form.stop button").last.click()

    reply = page.locator("article.assistant").last
    expect(reply.locator(".badge.stopped")).to_have_text("Stopped", timeout=30_000)
    kept = reply.locator(".body.md").inner_text()
    assert kept.strip(), "a stopped reply keeps its text"
    page.reload()
    expect(page.locator("article.assistant").last.locator(".badge.stopped")).to_be_visible()
    assert page.locator("article.assistant .body.md").last.inner_text() == kept


def test_it_keeps_streaming_across_a_reload(first_user_page: Page, live_site) -> None:
    page = first_user_page
    page.goto(live_site.url + "/")
    _start_chat(page, "Another long one please", max_tokens=1500)
    streaming = page.locator("article.assistant .streaming").last
    expect(streaming).not_to_be_empty(timeout=30_000)
    page.wait_for_timeout(700)
    before = len(streaming.inner_text())

    page.reload()
    streaming = page.locator("article.assistant .streaming").last
    if streaming.count():  # still streaming after the reload: it shows the text and goes on
        expect(streaming).not_to_be_empty()
        # The page first shows the row's text (flushed every half second), then the worker's
        # snapshot replaces it: wait for that, rather than read the length at one instant.
        page.wait_for_function(
            """min => {
                const e = [...document.querySelectorAll('article.assistant .streaming')].pop();
                return !e || e.textContent.length >= min;
            }""",
            arg=before * 0.5,
            timeout=30_000,
        )
    reply = page.locator("article.assistant").last
    expect(reply.locator(".body.md")).to_be_visible(timeout=120_000)
    assert len(reply.locator(".body.md").inner_text()) >= before * 0.5
    expect(reply.locator(".badge.stopped")).to_have_count(0)


def test_it_hides_one_users_chat_from_another(browser, first_user_page: Page, live_site) -> None:
    first_user_page.goto(live_site.url + "/")
    _start_chat(first_user_page, "A private thought")
    private_url = first_user_page.url

    context = browser.new_context()
    page = context.new_page()
    sign_up(page, live_site.url, "grace")
    # The models list is read-only for people who are not staff: no library actions.
    page.click(".topbar >> text=Models")
    expect(page.locator("main")).to_contain_text("ask them for one that is missing")
    expect(page.locator("main")).not_to_contain_text("Pull from the Hugging Face hub")
    page.goto(live_site.url + "/")
    expect(page.locator("#sidebar")).not_to_contain_text("A private thought")
    response = page.goto(private_url)
    assert response is not None and response.status == 404
    context.close()
