"""The API reference page (Swagger UI at /v1/docs) in chromium under the strict CSP."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.test_csp_browser import LISTEN, Watch

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def test_the_api_docs_load_under_the_csp(browser, live_site) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.add_init_script(LISTEN)
    watch = Watch(page, live_site.url)

    response = page.goto(f"{live_site.url}/v1/docs")

    assert response is not None and response.ok
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.get_by_text("/v1/chat/completions").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("mlxweb OpenAI-compatible API").first).to_be_visible()
    assert page.evaluate("window.__cspViolations") == []
    assert watch.console == [] and watch.remote == []
    page.close()
