"""Branches in chromium (issue 9): regenerate and the < 2/2 > arrows, edit and resend, reload
keeps every branch, the copy button copies, delete asks first. The tiny model answers."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import FilePayload, Page, expect

from tests.support.browser import signed_up_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

# Long enough for the first reply to load the model on a busy machine.
REPLY_TIMEOUT = 120_000


@pytest.fixture(scope="module")
def page(browser, live_site):  # type: ignore[no-untyped-def]
    clipboard = ["clipboard-read", "clipboard-write"]
    with signed_up_page(browser, live_site.url, "grace", permissions=clipboard) as page:
        page.click("details.options summary")
        page.fill("input[name=max_tokens]", "8")
        box = page.locator("#composer textarea[name=text]")
        box.fill("Name a colour.")
        box.press("Enter")
        # The first message also loads the model, which holds the in-process server up a while.
        page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"), timeout=REPLY_TIMEOUT)
        _wait_for_reply(page)
        yield page


def _wait_for_reply(page: Page) -> None:
    """Until the reply shown has ended (its Regenerate button comes with the final render)."""
    expect(page.locator("article.assistant button.regenerate")).to_have_count(
        1, timeout=REPLY_TIMEOUT
    )


def _reply(page: Page):  # type: ignore[no-untyped-def]
    return page.locator("article.assistant").last


def test_regenerate_shows_two_versions_and_the_arrows_move_between_them(page: Page) -> None:
    first_text = _reply(page).locator(".body.md").inner_text()
    _reply(page).locator("button.regenerate").click()
    expect(_reply(page).locator(".version-index")).to_have_text("2/2")
    _wait_for_reply(page)

    _reply(page).locator("button.version-previous").click()
    expect(_reply(page).locator(".version-index")).to_have_text("1/2")
    expect(_reply(page).locator(".body.md")).to_have_text(first_text)
    expect(_reply(page).locator("button.version-previous")).to_be_disabled()
    _reply(page).locator("button.version-next").click()
    expect(_reply(page).locator(".version-index")).to_have_text("2/2")


def test_edit_and_resend_makes_a_new_branch(page: Page) -> None:
    user = page.locator("article.user").last
    user.locator("details.edit-message summary").click()
    box = user.locator("details.edit-message textarea[name=content]")
    expect(box).to_have_value("Name a colour.")
    box.fill("Name a fruit.")
    user.locator("details.edit-message button[type=submit]").click()

    user = page.locator("article.user").last
    expect(user.locator(".body")).to_have_text("Name a fruit.")
    expect(user.locator(".version-index")).to_have_text("2/2")
    _wait_for_reply(page)
    expect(_reply(page).locator(".versions")).to_have_count(0)  # a new branch: one reply


def test_reload_keeps_every_branch(page: Page) -> None:
    page.reload()
    user = page.locator("article.user").last
    expect(user.locator(".body")).to_have_text("Name a fruit.")
    user.locator("button.version-previous").click()
    user = page.locator("article.user").last
    expect(user.locator(".body")).to_have_text("Name a colour.")
    expect(user.locator(".version-index")).to_have_text("1/2")
    # The first question's branch comes back with its newest reply, still one of two.
    expect(_reply(page).locator(".version-index")).to_have_text("2/2")
    page.reload()
    expect(page.locator("article.user").last.locator(".body")).to_have_text("Name a colour.")


def test_the_copy_button_copies_the_message(page: Page) -> None:
    button = page.locator("article.user").last.locator("button.copy-message")
    expect(button).to_be_visible()
    button.click()
    expect(button).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "Name a colour."
    reply_button = _reply(page).locator("button.copy-message")
    expect(reply_button).to_be_visible()


def test_delete_asks_first_then_takes_the_reply_and_shows_the_other_version(page: Page) -> None:
    reply = _reply(page)
    expect(reply.locator(".version-index")).to_have_text("2/2")
    confirm = reply.locator("button.confirm-delete")
    expect(confirm).to_be_hidden()
    reply.locator("details.delete-message summary").click()
    expect(reply.locator("details.delete-message")).to_contain_text("everything below it?")
    confirm.click()

    reply = _reply(page)
    expect(reply.locator(".versions")).to_have_count(0)  # one version left
    expect(page.locator("article.assistant")).to_have_count(1)
    page.reload()
    expect(page.locator("article.assistant")).to_have_count(1)
    expect(_reply(page).locator(".versions")).to_have_count(0)


def test_code_blocks_copy_and_a_link_to_a_message_is_marked(page: Page, live_site) -> None:
    # A reply with a code block, which the tiny model does not write: this conversation exported,
    # the text of the reply shown replaced, imported back (the import opens it).
    code = re.search(r"/c/([0-9a-f-]{36})/", page.url).group(1)  # type: ignore[union-attr]
    document = page.request.get(f"{live_site.url}/c/{code}/export/json/").json()
    conversation = document["conversation"]
    leaf = next(m for m in conversation["messages"] if m["id"] == conversation["leaf"])
    assert leaf["role"] == "assistant"
    leaf["generation"]["text"] = leaf["generation"]["content"] = (
        "Here:\n\n```python\nprint('copied')\n```\n"
    )
    conversation["title"] = "Code sample"
    page.goto(live_site.url + "/import/")
    page.set_input_files(
        "input[type=file]",
        files=FilePayload(
            name="code.json", mimeType="application/json", buffer=json.dumps(document).encode()
        ),
    )
    page.click("form.import-form button[type=submit]")
    expect(page.locator("#thread-header input[name=title]")).to_have_value("Code sample")

    button = _reply(page).locator("button.copy-code")
    expect(button).to_be_visible()
    button.click()
    expect(button).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('copied')"

    # A search hit's link: the message is marked and scrolled to.
    question = page.locator("article.user").last.get_attribute("id")
    assert question is not None
    page.goto(page.url.split("?")[0] + "?m=" + question.removeprefix("message-"))
    expect(page.locator("article.message.is-target")).to_have_attribute("id", question)


def test_fork_opens_a_new_conversation_with_the_path(page: Page) -> None:
    before = page.url.split("?")[0]
    question = page.locator("article.user").last.locator(".body").inner_text()
    _reply(page).locator("button.fork").click()
    expect(page.locator("#thread-header input[name=title]")).to_have_value("Code sample (fork)")
    assert page.url.split("?")[0] != before
    expect(page.locator("article.user").last.locator(".body")).to_have_text(question)
    expect(_reply(page).locator("button.copy-code")).to_be_visible()


def test_continue_writes_on_from_a_reply_that_hit_the_token_limit(page: Page) -> None:
    reply = _reply(page)
    expect(reply).to_contain_text("Hit the token limit")
    before = reply.locator(".body.md").inner_text()
    reply.locator("button.continue").click()
    expect(_reply(page).locator(".version-index")).to_have_text("2/2")
    _wait_for_reply(page)
    after = _reply(page).locator(".body.md").inner_text()
    assert after.startswith(before.rstrip()) and after != before


def test_a_long_branch_loads_its_earlier_messages_as_the_reader_scrolls_up(
    page: Page, live_site
) -> None:
    script = (
        "from django.contrib.auth.models import User; from chat import services; "
        "from inference.schemas import ChatMessage as M; "
        "turns = [M(role=r, content=f'{r} turn {i}') for i in range(70) "
        "for r in ('user', 'assistant')]; "
        "c = services.conversation_import(user=User.objects.get(username='grace'), "
        "model_id='tiny', messages=turns, title='A long one'); print(c.code)"
    )
    code = live_site.manage("shell", "-c", script).strip().splitlines()[-1]
    page.goto(f"{live_site.url}/c/{code}/")
    articles = page.locator("#messages article.message")
    expect(articles).to_have_count(60)
    first_shown = articles.first.get_attribute("id")

    page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    expect(articles).to_have_count(120)
    # The reader stays where they were: the message that was first is still in view.
    assert page.locator(f"#{first_shown}").is_visible()
    page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    expect(articles).to_have_count(140)
    expect(articles.first).to_contain_text("user turn 0")
    expect(page.locator("#earlier-messages")).to_have_count(0)


def test_details_show_provenance_and_a_token_fork_makes_a_new_version(
    page: Page, live_site
) -> None:
    page.goto(live_site.url + "/")
    box = page.locator("#composer textarea[name=text]")
    box.fill("Name a fruit.")
    box.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"), timeout=REPLY_TIMEOUT)
    _wait_for_reply(page)

    details = _reply(page).locator("details.reply-details")
    details.locator("summary").click()
    expect(details.locator("dl.provenance")).to_contain_text("tiny")
    details.get_by_text("Tokens and alternatives").click()
    first_token = details.locator(".token-trace a.token").first
    expect(first_token).to_be_visible()
    first_token.click()
    alternatives = details.locator("ol.alternatives li")
    expect(alternatives.first).to_be_visible()
    # An alternative the reply did not take: the fork goes on from it as a new version.
    other = details.locator("ol.alternatives li:not(:has(.badge))").first
    chosen = other.locator("code.alt-token").inner_text()
    other.get_by_role("button", name="Continue from here").click()
    expect(_reply(page).locator(".version-index")).to_have_text("2/2", timeout=REPLY_TIMEOUT)
    _wait_for_reply(page)
    assert _reply(page).locator(".body").inner_text().startswith(chosen.strip())
