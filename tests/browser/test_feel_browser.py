"""How the chat reads and feels in chromium: a page that holds still while only the messages
scroll (1280, 390 and 360 px wide, the drawer below 768 px), themes that follow the system and
a remembered switch, shortcuts and their help dialog, markdown that renders while it streams
(as the server renders it), KaTeX math, the Thinking section, one announcement when a reply
ends, the notice for a conversation whose model is gone, and not one console or CSP error.

Screenshots go to $MLXWEB_SCREENSHOTS (a temporary folder when unset) to be looked at."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from chat.markdown import render_markdown
from tests.support.browser import sign_up
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


LISTEN = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""

REPLY = r"""The area of a circle is $A = \pi r^2$, and

$$
\int_0^1 x^2\,dx = \frac{1}{3}
$$

| step | done |
|:-----|-----:|
| one  | yes  |

- [x] read the question
- [ ] answer it

```python
"""
REPLY += 'line = "a very long line that goes' + " on and on" * 30 + '"\n```\n'

# Rows written the way the chat writes them: a path of user and assistant messages, the
# conversation's leaf at its end, each reply with reasoning the worker split off.
SEED = """
from datetime import timedelta
from django.contrib.auth.models import User
from django.utils import timezone
from chat.models import Conversation, Message
from inference.models import Generation
user = User.objects.get(username="ada")
conversation = Conversation.objects.create(user=user, model_id=MODEL, title=TITLE)
parent = None
now = timezone.now()
for i in range(PAIRS):
    parent = Message.objects.create(
        conversation=conversation, role="user", parent=parent,
        content=f"Question {i}: " + "a_word_with_no_break_" * 12,
    )
    reasoning = "The user asks about circles. Recall the formula."
    generation = Generation.objects.create(
        model_id=MODEL, state="complete", finish_reason="eos", completion_tokens=80,
        text="<think>" + reasoning + "</think>" + REPLY, reasoning=reasoning, content=REPLY,
        created_at=now - timedelta(seconds=1), first_token_at=now,
        finished_at=now + timedelta(seconds=20),
    )
    parent = Message.objects.create(
        conversation=conversation, role="assistant", parent=parent, generation=generation
    )
conversation.leaf = parent
conversation.save()
print(conversation.code)
"""

METRICS = """() => {
    const box = (sel) => document.querySelector(sel).getBoundingClientRect();
    const messages = document.getElementById("messages");
    return {
        scrollWidth: document.scrollingElement.scrollWidth,
        scrollHeight: document.scrollingElement.scrollHeight,
        innerWidth: window.innerWidth,
        innerHeight: window.innerHeight,
        messagesScroll: messages.scrollHeight > messages.clientHeight + 10,
        topbarTop: box(".topbar").top,
        composerBottom: box("#composer").bottom,
    };
}"""


def _seed(live_site: Any, *, title: str, pairs: int = 1, model: str = "tiny") -> str:
    script = f"MODEL = {model!r}\nTITLE = {title!r}\nPAIRS = {pairs}\nREPLY = {REPLY!r}\n" + SEED
    return str(live_site.manage("shell", "-c", script).strip().splitlines()[-1])


def _shots() -> Path:
    folder = Path(os.environ.get("MLXWEB_SCREENSHOTS") or "/tmp/mlxweb-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Errors:
    """Console errors, uncaught exceptions and CSP violations from every page watched."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, context: BrowserContext) -> None:
        context.add_init_script(LISTEN)
        context.on("page", self._page)
        for page in context.pages:
            self._page(page)

    def _page(self, page: Page) -> None:
        page.on(
            "console",
            lambda m: self.seen.append(f"console: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.seen.append(f"pageerror: {e}"))

    def check(self, page: Page) -> None:
        violations = page.evaluate("window.__cspViolations || []")
        assert violations == [], violations
        assert self.seen == [], self.seen


@pytest.fixture(scope="module")
def errors() -> Errors:
    return Errors()


@pytest.fixture(scope="module")
def desk(browser, live_site, errors: Errors) -> Iterator[Page]:  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    errors.watch(context)
    page = context.new_page()
    sign_up(page, live_site.url, "ada")
    yield page
    context.close()


@pytest.fixture(scope="module")
def long_chat(live_site, desk: Page) -> str:  # type: ignore[no-untyped-def]
    return _seed(live_site, title="Circles", pairs=6)


def _send(page: Page, text: str, max_tokens: int, temperature: str = "") -> None:
    if not page.locator("input[name=max_tokens]").is_visible():
        page.click("details.options summary")
    page.fill("input[name=max_tokens]", str(max_tokens))
    page.fill("input[name=temperature]", temperature)
    box = page.locator("#composer textarea[name=text]")
    box.fill(text)
    box.press("Enter")


def test_it_scrolls_only_the_messages_at_1280(desk: Page, live_site, long_chat: str) -> None:  # type: ignore[no-untyped-def]
    page = desk
    page.goto(f"{live_site.url}/c/{long_chat}/")
    expect(page.locator("article.assistant")).to_have_count(6)

    metrics = page.evaluate(METRICS)
    assert metrics["scrollWidth"] <= metrics["innerWidth"], metrics
    assert metrics["scrollHeight"] <= metrics["innerHeight"], metrics  # the page never scrolls
    assert metrics["messagesScroll"], metrics  # the list does
    page.locator("#messages").evaluate("m => { m.scrollTop = 0; }")
    metrics = page.evaluate(METRICS)
    assert metrics["topbarTop"] == 0 and metrics["composerBottom"] <= metrics["innerHeight"]
    # The long code line scrolls inside its block.
    pre = page.locator("article.assistant .md pre").first
    assert pre.evaluate("p => p.scrollWidth > p.clientWidth")
    page.screenshot(path=str(_shots() / "chat-1280.png"))


def test_it_typesets_math_and_renders_tables_task_lists_and_thinking(
    desk: Page, live_site, long_chat: str
) -> None:  # type: ignore[no-untyped-def]
    page = desk
    page.goto(f"{live_site.url}/c/{long_chat}/")
    reply = page.locator("article.assistant").last
    expect(reply.locator(".math-inline .katex")).to_have_count(1)
    expect(reply.locator(".math-display .katex-display")).to_have_count(1)
    expect(reply.locator("td.align-right")).to_have_text("yes")
    expect(reply.locator(".contains-task-list input[type=checkbox]:checked")).to_have_count(1)
    expect(reply.locator(".contains-task-list input[type=checkbox]:disabled")).to_have_count(2)
    # The reasoning sits apart from the answer, collapsed, saying how long and how much.
    thinking = reply.locator("details.thinking")
    expect(thinking).to_have_count(1)
    assert thinking.evaluate("d => !d.open")
    expect(thinking.locator("summary")).to_have_text(
        re.compile(r"^Thought for about \d+ s · 8 words$")
    )
    expect(reply.locator(".body.md")).not_to_contain_text("The user asks about circles")


SAMPLES = [
    "# Title\n\nSome *emphasis*, `code` and a [link](https://example.com).",
    "Math $e^{i\\pi} = -1$ and $5 or $6, then\n\n$$\n\\sum_{k=1}^n k\n$$\n",
    "LaTeX style \\(a^2\\) and \\[b^2\\], an escaped \\* star",
    "| a | b |\n|:-|-:|\n| 1 | 2 |\n\n- [ ] open\n- [x] done\n\n1. one\n2. two",
    "<script>alert(1)</script> <b>raw</b> [x](javascript:alert(1)) ![remote](http://x.test/i.png)",
    "```\nplain fence <b>\n```\n\n> quote ~~struck~~",
]


def test_the_browser_renders_markdown_as_the_server_does(desk: Page, live_site) -> None:  # type: ignore[no-untyped-def]
    page = desk
    page.goto(live_site.url + "/")
    normalize = """(html) => { const t = document.createElement("template"); t.innerHTML = html;
        return t.innerHTML.replace(/\\s+/g, " ").trim(); }"""
    for text in SAMPLES:
        browser_html = page.evaluate("(t) => window.mlxwebMarkdown.render(t)", text)
        assert page.evaluate(normalize, browser_html) == page.evaluate(
            normalize, str(render_markdown(text))
        ), text


def test_it_streams_markdown_stops_on_esc_and_announces_the_end(desk: Page, live_site) -> None:  # type: ignore[no-untyped-def]
    page = desk
    page.goto(live_site.url + "/")
    # Greedy, so the random text before the fence and list appended below is the same every
    # run (sampled, it differs, and what it holds can change how they parse; this check once
    # timed out in a full run).
    _send(page, "Write a very long story", max_tokens=2000, temperature="0")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    live = page.locator("article.assistant .streaming").last
    expect(live).not_to_be_empty(timeout=60_000)
    # What shows is rendered markdown, not the raw text.
    expect(live.locator("p").first).to_be_attached()
    # A code fence and a list arriving mid-stream look right before the end, and reasoning
    # (the worker's "reasoning" channel) opens the Thinking section: append them the way htmx
    # appends a delta, as text to the hidden sources (again if the worker's snapshot, sent when
    # the socket connects, replaced the live reply in between).
    page.wait_for_function(
        """([text, thought]) => {
            const lives = document.querySelectorAll("article.assistant .live");
            if (!lives.length) return false;
            const live = lives[lives.length - 1];
            const answer = live.querySelector('.stream-source[id$="-text"]');
            const reasoning = live.querySelector('.stream-source[id$="-reasoning"]');
            if (!answer.textContent.includes(text)) answer.append(document.createTextNode(text));
            if (!reasoning.textContent) reasoning.append(document.createTextNode(thought));
            const code = live.querySelector(".streaming pre code");
            const items = [...live.querySelectorAll(".streaming ul > li")].map(
                (li) => li.textContent
            );
            const thinking = live.querySelector("details.thinking");
            return !!code && code.textContent === "x = 1\\n" && items.includes("first") &&
                !thinking.hidden && thinking.open && !!thinking.querySelector(".md-live em");
        }""",
        arg=["\n\n```\nx = 1\n```\n\n- first\n- second\n\n", "Let me *think*."],
        timeout=30_000,
    )
    # The answer goes on streaming after that reasoning: the section says how long it took.
    expect(page.locator("article.assistant details.thinking summary").last).to_have_text(
        re.compile(r"^Thought for \d+ s$")
    )
    # Esc stops it (focus in the message box, as it is after sending).
    page.locator("#composer textarea[name=text]").focus()
    page.keyboard.press("Escape")
    reply = page.locator("article.assistant").last
    expect(reply.locator(".badge.stopped")).to_be_visible(timeout=30_000)
    expect(page.locator("#announcer")).to_have_text("Reply stopped.")
    assert page.locator("#messages").get_attribute("aria-live") is None

    # A reply that ends by itself: a chat whose options (4 tokens at most) stick, and a second
    # message sent over its socket, so this page sees the reply go from live to final.
    page.goto(live_site.url + "/")
    _send(page, "A short one", max_tokens=4)
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    # Reloaded until the row is final: a reply that ends between the page's render and its
    # socket joining the conversation gets no final frame (the consumer syncs only the replies
    # still active when it connects), and this one takes a fraction of a second.
    wait_until(
        lambda: page.reload() and page.locator("article.assistant .body.md").count() == 1,
        timeout=60,
        interval=0.5,
        what="the short reply's final render",
    )
    box = page.locator("#composer textarea[name=text]")
    box.fill("And another")
    box.press("Enter")
    expect(page.locator("article.assistant .body.md")).to_have_count(2, timeout=60_000)
    expect(page.locator("#announcer")).to_have_text("Reply finished.")


def test_it_remembers_the_theme_over_a_reload(desk: Page, live_site) -> None:  # type: ignore[no-untyped-def]
    page = desk
    page.goto(live_site.url + "/")
    page.evaluate("localStorage.removeItem('mlxweb-theme')")
    page.emulate_media(color_scheme="dark")
    page.reload()
    background = "() => getComputedStyle(document.body).backgroundColor"
    assert page.evaluate("document.documentElement.dataset.theme") is None
    assert page.evaluate(background) == "rgb(21, 22, 26)"  # the system's dark
    toggle = page.locator(".theme-toggle")
    expect(toggle).to_have_attribute("aria-label", re.compile("follows the system"))
    toggle.click()
    assert page.evaluate(background) == "rgb(247, 247, 248)"  # light, over the system's dark
    toggle.click()
    expect(toggle).to_have_attribute("aria-label", re.compile("^Theme: dark"))
    page.emulate_media(color_scheme="light")
    # Set before the first paint by the blocking script in <head>, not after the page loads.
    page.reload(wait_until="commit")
    page.wait_for_selector("body")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    page.wait_for_load_state()
    assert page.evaluate(background) == "rgb(21, 22, 26)"
    toggle.click()  # back to following the system
    assert page.evaluate("localStorage.getItem('mlxweb-theme')") is None
    assert page.evaluate(background) == "rgb(247, 247, 248)"
    page.screenshot(path=str(_shots() / "chat-1280-light.png"))
    page.emulate_media(color_scheme="dark")
    page.goto(page.url)
    page.screenshot(path=str(_shots() / "chat-1280-dark.png"))
    page.emulate_media(color_scheme="light")


def test_its_shortcuts_work_and_are_listed(desk: Page, live_site, long_chat: str) -> None:  # type: ignore[no-untyped-def]
    page = desk
    page.goto(f"{live_site.url}/c/{long_chat}/")
    help_button = page.locator("button.help-open")
    expect(help_button).to_have_attribute("aria-label", "Keyboard shortcuts")
    help_button.click()
    dialog = page.locator("dialog#shortcuts")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("New chat")
    expect(dialog).to_contain_text("Stop the reply")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("?")
    expect(dialog).to_be_visible()
    dialog.locator("button", has_text="Close").click()
    expect(dialog).to_be_hidden()

    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("Control+Shift+E")
    assert page.evaluate("document.activeElement.name") == "text"
    page.keyboard.press("Control+K")
    if page.locator("#sidebar input[type=search]").count():  # the search box (issue 9, search)
        assert page.evaluate("document.activeElement.type") == "search"
    page.keyboard.press("Control+Shift+O")
    page.wait_for_url(live_site.url + "/")
    expect(page.locator("#thread-header")).to_contain_text("New chat")


@pytest.mark.parametrize("width", [390, 360])
def test_it_fits_a_phone_and_opens_the_drawer(
    browser, live_site, desk: Page, long_chat: str, errors: Errors, width: int
) -> None:  # type: ignore[no-untyped-def]
    context = browser.new_context(
        viewport={"width": width, "height": 800},
        storage_state=desk.context.storage_state(),
        reduced_motion="reduce",  # the drawer opens without its slide
    )
    errors.watch(context)
    page = context.new_page()
    page.goto(f"{live_site.url}/c/{long_chat}/")
    expect(page.locator("article.assistant .math-inline .katex").first).to_be_visible()
    metrics = page.evaluate(METRICS)
    assert metrics["scrollWidth"] <= metrics["innerWidth"], metrics
    assert metrics["scrollHeight"] <= metrics["innerHeight"], metrics
    assert metrics["messagesScroll"], metrics

    sidebar = page.locator("#sidebar")
    toggle = page.locator("button.drawer-toggle")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_have_attribute("aria-label", "Show conversations")
    if width == 390:
        page.screenshot(path=str(_shots() / "chat-390.png"))
    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    box = sidebar.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    expect(sidebar.locator("li.current a")).to_have_text("Circles")
    if width == 390:
        page.screenshot(path=str(_shots() / "chat-390-drawer.png"))
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    assert page.evaluate(METRICS)["scrollWidth"] <= width
    context.close()


def test_a_conversation_whose_model_is_gone_says_so(desk: Page, live_site) -> None:  # type: ignore[no-untyped-def]
    code = _seed(live_site, title="Old model", model="deleted-model")
    desk.goto(f"{live_site.url}/c/{code}/")
    notice = desk.locator(".model-notice")
    expect(notice).to_contain_text("deleted-model, is no longer on this server")
    expect(notice).to_contain_text("Pick another model")
    expect(desk.locator("#composer select[name=model]")).to_be_enabled()


def test_no_page_logged_a_console_or_csp_error(desk: Page, errors: Errors) -> None:
    errors.check(desk)
