"""Presets and a conversation's settings in chromium (issue 9): make a preset (a bad value is
refused next to its field), start a chat with it, change the settings in the side panel, see
them stick across a reload, and read the composer's context meter and cache line."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import signed_up_page, tiny_site
from tests.support.live import Site

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

BUILTIN_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "presets"


@pytest.fixture(scope="module")
def presets_site(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Site]:
    """The browser tests' live site, with the built-in presets in its configs folder."""
    root = tmp_path_factory.mktemp("presets-site")
    shutil.copytree(BUILTIN_PRESETS, root / "configs" / "presets")
    with tiny_site(root, tiny_model_dir) as site:
        yield site


@pytest.fixture(scope="module")
def page(browser, presets_site: Site) -> Iterator[Page]:  # type: ignore[no-untyped-def]
    with signed_up_page(browser, presets_site.url, "grace") as page:
        yield page


def test_it_makes_a_preset_refusing_a_bad_value_next_to_its_field(
    page: Page, presets_site: Site
) -> None:
    page.goto(presets_site.url + "/presets/")
    expect(page.locator(".presets-table")).to_contain_text("deterministic")
    page.click("text=New preset")
    page.fill("input[name=name]", "Pirate")
    page.select_option("select[name=extends]", "deterministic")
    page.fill("textarea[name=system_prompt]", "You are a pirate. Today is {date}; {weekday}.")
    page.fill("input[name=temperature]", "5")
    page.click("button:has-text('Save')")
    expect(page.locator("#id_temperature-error")).to_have_text(
        "Temperature goes from 0 to 2; 5 is out of range."
    )
    expect(page.locator("#id_system_prompt-error")).to_contain_text("unknown placeholder {weekday}")
    page.fill("textarea[name=system_prompt]", "You are a pirate. Today is {date}.")
    page.fill("input[name=temperature]", "")
    page.fill("input[name=max_tokens]", "16")
    page.click("button:has-text('Save')")
    row = page.locator("tr", has_text="Pirate")
    expect(row).to_contain_text("extends deterministic → balanced")
    expect(row).to_contain_text("max_tokens 16")


def test_a_chat_keeps_its_preset_and_settings_and_shows_the_meter(
    page: Page, presets_site: Site
) -> None:
    page.goto(presets_site.url + "/")
    page.select_option("select[name=preset]", "Pirate")
    box = page.locator("textarea[name=text]")
    box.fill("Hello")
    box.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    # The first reply also loads the model. The page may render the reply while it streams and
    # open its socket just after it ended (a race of the chat page: the socket only catches up
    # on replies still running), so look again until the finished reply shows.
    deadline = time.monotonic() + 120
    while True:
        try:
            expect(page.locator("article.assistant .body.md")).to_have_count(1, timeout=5_000)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "the first reply did not finish"
            page.reload()

    panel = page.locator("#settings-panel")
    expect(panel.locator("summary")).to_contain_text("preset Pirate")
    panel.locator("summary").click()
    temperature = panel.locator("input[name='settings-temperature']")
    expect(temperature).to_have_attribute("placeholder", "0.0")  # deterministic's, via Pirate
    temperature.fill("3")
    panel.locator("button:has-text('Save settings')").click()
    expect(page.locator("#id_settings-temperature-error")).to_have_text(
        "Temperature goes from 0 to 2; 3 is out of range."
    )
    page.locator("input[name='settings-temperature']").fill("0.5")
    page.locator("#settings-panel button:has-text('Save settings')").click()
    expect(page.locator(".settings-saved")).to_be_visible()
    # The composer's options show the saved value at once, and both survive a reload.
    expect(page.locator("#composer input[name=temperature]")).to_have_value("0.5")
    page.reload()
    expect(page.locator("input[name='settings-temperature']")).to_have_value("0.5")
    expect(page.locator("#composer input[name=temperature]")).to_have_value("0.5")

    # The meter: the measured size of the conversation against the tiny model's 2,048, and
    # what the prompt cache holds for the next turn while typing.
    meter = page.locator("#composer-meter")
    expect(meter).to_contain_text("of 2,048 tokens", timeout=30_000)
    page.locator("textarea[name=text]").fill("And what is the capital of France, matey?")
    expect(meter).to_contain_text("are in the prompt cache", timeout=30_000)
    expect(meter).to_contain_text("Switching model")
