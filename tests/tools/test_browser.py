"""The browser tools against local targets only: pages, redirects and subresources to private
addresses, oversized and slow pages, and an SSRF table refused without a connection.

Nothing here sends traffic beyond 127.0.0.0/8: "public" addresses are judged by the classifier
alone, and a "public-looking" host is a name the test's resolver maps onto the allow-listed
127.0.0.1, while the private target is a second server on 127.0.0.2 that records its hits.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.tools import browser as browser_module
from inference.tools.base import ToolContext, ToolResult
from inference.tools.browser import (
    BrowserSettings,
    EgressPolicy,
    Refused,
    is_public_address,
    tools,
)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"


class _Server:
    """A threaded HTTP server on one loopback address that records the paths it was asked for."""

    def __init__(self, host: str, routes: dict[str, Any]) -> None:
        self.hits: list[str] = []
        hits, table = self.hits, routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                route = table.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                status, headers, body = route() if callable(route) else route
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.base = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _html(body: str, title: str = "Page") -> tuple[int, dict[str, str], bytes]:
    page = f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"
    return 200, {"Content-Type": "text/html; charset=utf-8"}, page.encode()


@pytest.fixture(scope="module")
def private_target() -> Iterator[_Server]:
    """The address a successful SSRF would reach: any hit here is a failure."""
    server = _Server("127.0.0.2", {"/": _html("secret"), "/img.png": _html("secret")})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(private_target: _Server) -> Iterator[_Server]:
    target = private_target.base

    def slow() -> tuple[int, dict[str, str], bytes]:
        time.sleep(4)
        return _html("late")

    routes: dict[str, Any] = {
        "/": _html(
            "<main><h1>Welcome</h1><p>The quick brown fox.</p><p>Jumps over the lazy dog.</p>"
            '<a href="/second">Second page</a> <a href="/third">Third page</a></main>',
            title="Home",
        ),
        "/second": _html("<p>This is the second page.</p>", title="Second"),
        "/third": _html("<p>Third.</p>", title="Third"),
        "/redirect-private": (302, {"Location": f"{target}/"}, b""),
        "/redirect-named": (
            302,
            {"Location": f"http://intranet.example:{target.split(':')[-1]}/"},
            b"",
        ),
        "/hop": (302, {"Location": "/redirect-private"}, b""),
        "/subresource": _html(f'<p>Has an image.</p><img src="{target}/img.png">', title="Sub"),
        "/private-link": _html(f'<a href="{target}/">intranet</a>', title="Links"),
        "/big": _html("<p>" + "x" * 200_000 + "</p>", title="Big"),
        "/slow": slow,
        "/download": (
            200,
            {"Content-Type": "application/octet-stream", "Content-Disposition": "attachment"},
            b"\x00" * 100,
        ),
    }
    server = _Server("127.0.0.1", routes)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tool tests need Debian's chromium at {CHROMIUM}")
    settings = BrowserSettings()
    with browser_module.launch_chromium(settings) as browser:
        yield browser


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names a test can use without a DNS server; everything else goes to the real resolver."""
    real = browser_module.resolve_host
    names = {
        "intranet.example": [ipaddress.ip_address("127.0.0.2")],
        "public.example": [ipaddress.ip_address("127.0.0.1")],
        "rebind.example": [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.1")],
    }

    def resolve(host: str) -> list[Any]:
        return list(names[host]) if host in names else real(host)

    monkeypatch.setattr(browser_module, "resolve_host", resolve)


def _context(tmp_path: Path, timeout: float = 30.0) -> ToolContext:
    return ToolContext(workspace=tmp_path, cancelled=lambda: False, timeout=timeout)


def _run(
    shared_chromium: Any,
    tmp_path: Path,
    name: str,
    arguments: dict[str, Any],
    **settings: Any,
) -> ToolResult:
    @contextlib.contextmanager
    def launcher(_: BrowserSettings) -> Iterator[Any]:
        yield shared_chromium

    by_name = {tool.name: tool for tool in tools(BrowserSettings(**settings), launcher=launcher)}
    return by_name[name].run(arguments, _context(tmp_path))


# Loopback 127.0.0.1 (the test site) is allow-listed by network; 127.0.0.2 stays private.
ALLOW_SITE = {"allow_hosts": ("127.0.0.1",)}


def test_it_fetches_readable_text_and_numbered_links(
    shared_chromium: Any, site: _Server, tmp_path: Path
) -> None:
    result = _run(
        shared_chromium, tmp_path, "browser_fetch", {"url": site.base + "/"}, **ALLOW_SITE
    )
    assert result.ok, result.error
    assert "# Home" in result.text
    assert "The quick brown fox." in result.text
    assert f"[1] Second page <{site.base}/second>" in result.text
    assert f"[2] Third page <{site.base}/third>" in result.text
    assert result.data["title"] == "Home"


def test_it_finds_passages(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_find",
        {"url": site.base + "/", "query": "LAZY"},
        **ALLOW_SITE,
    )
    assert result.ok, result.error
    assert "Jumps over the lazy dog." in result.text
    assert "quick brown fox" not in result.text
    assert result.data["matches"] == 1


def test_it_follows_a_link(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_follow",
        {"url": site.base + "/", "link": 2},
        **ALLOW_SITE,
    )
    assert result.ok, result.error
    assert "# Third" in result.text
    assert result.data["url"] == site.base + "/third"


def test_it_refuses_a_link_number_the_page_lacks(
    shared_chromium: Any, site: _Server, tmp_path: Path
) -> None:
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_follow",
        {"url": site.base + "/", "link": 9},
        **ALLOW_SITE,
    )
    assert not result.ok
    assert "no link 9" in result.error


def test_it_takes_a_screenshot_into_the_workspace(
    shared_chromium: Any, site: _Server, tmp_path: Path
) -> None:
    result = _run(
        shared_chromium, tmp_path, "browser_screenshot", {"url": site.base + "/"}, **ALLOW_SITE
    )
    assert result.ok, result.error
    (file,) = result.files
    assert file.mime == "image/png"
    assert file.path.is_relative_to(tmp_path)
    assert file.path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_it_works_with_allow_private(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_fetch",
        {"url": site.base + "/second"},
        allow_private=True,
    )
    assert result.ok, result.error
    assert "second page" in result.text


# --- the SSRF table: refused with the default settings, before any connection ---

SSRF_HOSTS = [
    "127.0.0.1",
    "localhost",
    "localhost.",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "[::1]",
    "[fd00::1]",
    "[fe80::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:169.254.169.254]",
    "0.0.0.0",
    "[::]",
    "224.0.0.1",
    "100.64.0.1",
    "2130706433",  # 127.0.0.1 as one number, which chromium and getaddrinfo both accept
    "0x7f.1",
    "intranet.example",  # the test's resolver maps it to 127.0.0.2
    "rebind.example",  # one loopback answer and one private: any private answer refuses
]


@pytest.mark.parametrize("host", SSRF_HOSTS)
def test_it_refuses_private_addresses_without_connecting(
    host: str, private_target: _Server, site: _Server, tmp_path: Path
) -> None:
    before = (len(private_target.hits), len(site.hits))

    def no_browser(_: BrowserSettings) -> Any:
        raise AssertionError("a refused URL must not start a browser")

    fetch = tools(BrowserSettings(), launcher=no_browser)[0]
    result = fetch.run({"url": f"http://{host}:{private_target.port}/"}, _context(tmp_path))
    assert not result.ok
    assert result.error.startswith("refused:"), result.error
    assert (len(private_target.hits), len(site.hits)) == before


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/",
        "javascript:alert(1)",
        "http://user:pw@example.org/",
        "data:text/html,hi",
        "http:///nohost",
    ],
)
def test_it_refuses_other_schemes_and_credentials(url: str, tmp_path: Path) -> None:
    result = tools(BrowserSettings())[0].run({"url": url}, _context(tmp_path))
    assert not result.ok
    assert result.error.startswith("refused:")


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"],
)
def test_it_classifies_public_addresses_as_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a9fe:a9fe",
        "fec0::1",
        "240.0.0.1",
        "255.255.255.255",
        "ff02::1",
        "198.18.0.1",
    ],
)
def test_it_classifies_embedded_and_reserved_addresses_as_private(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


def test_it_refuses_a_redirect_to_a_private_address(
    shared_chromium: Any, site: _Server, private_target: _Server, tmp_path: Path
) -> None:
    before = len(private_target.hits)
    for path in ("/redirect-private", "/hop", "/redirect-named"):
        result = _run(
            shared_chromium,
            tmp_path,
            "browser_fetch",
            {"url": f"http://public.example:{site.port}{path}"},
            **ALLOW_SITE,
        )
        assert not result.ok, path
        assert result.error.startswith("refused:"), result.error
    assert len(private_target.hits) == before


def test_it_blocks_a_private_subresource(
    shared_chromium: Any, site: _Server, private_target: _Server, tmp_path: Path
) -> None:
    before = len(private_target.hits)
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_fetch",
        {"url": site.base + "/subresource"},
        **ALLOW_SITE,
    )
    assert result.ok, result.error
    assert "Has an image." in result.text
    assert any("127.0.0.2" in blocked for blocked in result.data["blocked"])
    assert len(private_target.hits) == before


def test_it_refuses_to_follow_a_link_to_a_private_address(
    shared_chromium: Any, site: _Server, private_target: _Server, tmp_path: Path
) -> None:
    before = len(private_target.hits)
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_follow",
        {"url": site.base + "/private-link", "link": 1},
        **ALLOW_SITE,
    )
    assert not result.ok
    assert result.error.startswith("refused:")
    assert len(private_target.hits) == before


def test_it_keeps_the_deny_list_over_the_allow_list(tmp_path: Path) -> None:
    policy = EgressPolicy(BrowserSettings(allow_private=True, deny_hosts=(".example",)))
    with pytest.raises(Refused, match="deny-list"):
        policy.check_host("public.example")
    allow_only = EgressPolicy(BrowserSettings(allow_hosts=("docs.python.org",)))
    with pytest.raises(Refused, match="allow-list"):
        allow_only.check_host("public.example")


def test_it_refuses_an_oversized_page(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_fetch",
        {"url": site.base + "/big"},
        max_page_bytes=50_000,
        **ALLOW_SITE,
    )
    assert not result.ok
    assert "larger than" in result.error


def test_it_caps_the_text(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_fetch",
        {"url": site.base + "/big"},
        max_text_chars=1_000,
        **ALLOW_SITE,
    )
    assert result.ok, result.error
    assert len(result.text) <= 1_000
    assert "truncated" in result.text


def test_it_gives_up_on_a_slow_page(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(
        shared_chromium,
        tmp_path,
        "browser_fetch",
        {"url": site.base + "/slow"},
        navigation_timeout=1.0,
        **ALLOW_SITE,
    )
    assert not result.ok
    assert "timed out" in result.error
    assert time.monotonic() - started < 4


def test_it_refuses_downloads(shared_chromium: Any, site: _Server, tmp_path: Path) -> None:
    result = _run(
        shared_chromium, tmp_path, "browser_fetch", {"url": site.base + "/download"}, **ALLOW_SITE
    )
    assert not result.ok
    assert "download" in result.error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments",
    [{}, {"url": 3}, {"url": ""}, {"url": "http://127.0.0.1/", "link": "x"}],
)
def test_it_answers_bad_arguments_with_a_reason(arguments: dict[str, Any], tmp_path: Path) -> None:
    follow = tools(BrowserSettings(allow_private=True))[2]
    result = follow.run(arguments, _context(tmp_path))
    assert not result.ok
    assert result.error


def test_it_says_why_when_chromium_is_missing() -> None:
    fetch = tools(BrowserSettings(executable_path="/nonexistent/chromium"))[0]
    why = fetch.availability()
    assert why is not None and "chromium" in why


def test_it_bounds_its_settings() -> None:
    with pytest.raises(ValueError):
        BrowserSettings(navigation_timeout=10_000)
    with pytest.raises(ValueError):
        BrowserSettings(max_text_chars=1_000_000)
    assert BrowserSettings().allow_private is False
