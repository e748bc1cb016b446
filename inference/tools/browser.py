"""The web browser tools: fetch a page's readable text, search in it, follow a link, screenshot it.

Debian's chromium runs through Playwright, a fresh browser context per call. Every byte the browser
sends leaves through an egress proxy of our own (`EgressProxy`) that resolves the host once, refuses
private, loopback, link-local, multicast, reserved and unspecified addresses (and the configured
deny-list), and connects to the address it checked: redirects, subresources, preconnects and
websockets all pass through it, and DNS rebinding finds nothing to rebind. Playwright's
`context.route` checks each request the page makes as well (it gives a clear early refusal), but it
never sees redirect hops, so the proxy is the enforcement.

Note for callers: Playwright's sync API refuses to run on a thread with a running asyncio loop, so
`run` moves itself to a thread of its own when it finds one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import logging
import re
import select
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from inference.tools.base import MAX_RESULT_CHARS, Tool, ToolContext, ToolFile, ToolResult

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Route

__all__ = [
    "BrowserSettings",
    "EgressPolicy",
    "EgressProxy",
    "Refused",
    "is_public_address",
    "resolve_host",
    "tools",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # WebRTC could otherwise reach addresses without the proxy.
    "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
    "--webrtc-ip-handling-policy=disable_non_proxied_udp",
)
# Marks the proxy's own refusals, so a refused navigation is told apart from a site's 403.
REFUSED_HEADER = "X-Mlxweb-Refused"


class BrowserSettings(BaseModel):
    """The browser tools' configuration (the server config's `tools.browser`), bounded.

    `allow_hosts` and `deny_hosts` take host globs (`*.example.org`), suffixes (`.example.org`:
    the domain and its subdomains) or IP networks (`203.0.113.0/24`, `127.0.0.1`). A non-empty
    allow-list admits only what it matches. Private addresses stay refused unless `allow_private`
    or an allow-listed network names them: an allow-listed host name alone never does, since its
    DNS could point anywhere.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    executable_path: str = "/usr/bin/chromium"
    allow_hosts: tuple[str, ...] = Field((), max_length=200)
    deny_hosts: tuple[str, ...] = Field((), max_length=200)
    allow_private: bool = False
    navigation_timeout: float = Field(15.0, gt=0, le=120)
    max_call_seconds: float = Field(45.0, gt=0, le=300)
    # Every response byte the page loads in one call, all requests together.
    max_page_bytes: int = Field(10_000_000, ge=1_000, le=200_000_000)
    max_text_chars: int = Field(12_000, ge=200, le=MAX_RESULT_CHARS)
    max_links: int = Field(80, ge=0, le=500)
    max_find_passages: int = Field(10, ge=1, le=50)
    viewport_width: int = Field(1280, ge=320, le=3840)
    viewport_height: int = Field(800, ge=240, le=2160)


class Refused(Exception):
    """A URL or host the policy refuses; the message says why (shown to the model)."""


def resolve_host(host: str) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal is itself). Tests monkeypatch this."""
    host = host.strip("[]")
    with contextlib.suppress(ValueError):
        return [ipaddress.ip_address(host)]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"cannot resolve {host}: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """Whether `address` is a globally routable unicast address (IPv4 inside IPv6 checked too)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
        if address.is_site_local:
            return False
    return not (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _networks(entries: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for entry in entries:
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
    return networks


def _host_matches(host: str, patterns: tuple[str, ...]) -> bool:
    for raw in patterns:
        pattern = raw.lower().rstrip(".")
        if pattern.startswith("."):
            if host == pattern[1:] or host.endswith(pattern):
                return True
        elif fnmatch.fnmatchcase(host, pattern):
            return True
    return False


@dataclass(frozen=True)
class EgressPolicy:
    """Decides which hosts the browser may reach, after resolving them."""

    settings: BrowserSettings

    def check_url(self, url: str) -> list[IPAddress]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise Refused(f"only http and https URLs are allowed, not {parts.scheme or 'none'!r}")
        if parts.username or parts.password:
            raise Refused("URLs with credentials are refused")
        if not parts.hostname:
            raise Refused("the URL has no host")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise Refused("the URL's port is not valid") from None
        return self.check_host(parts.hostname)

    def check_host(self, host: str) -> list[IPAddress]:
        """The addresses to connect to for `host`, or Refused with the reason."""
        host = host.strip("[]").lower().rstrip(".")
        if not host:
            raise Refused("the URL has no host")
        settings = self.settings
        if _host_matches(host, settings.deny_hosts):
            raise Refused(f"{host} is on the deny-list")
        addresses = resolve_host(host)
        if not addresses:
            raise Refused(f"{host} resolves to no address")
        denied = _networks(settings.deny_hosts)
        allowed = _networks(settings.allow_hosts)
        for address in addresses:
            if any(address in network for network in denied):
                raise Refused(f"{host} ({address}) is on the deny-list")
        if settings.allow_hosts and not (
            _host_matches(host, settings.allow_hosts)
            or all(any(a in network for network in allowed) for a in addresses)
        ):
            raise Refused(f"{host} is not on the allow-list")
        for address in addresses:
            if settings.allow_private or any(address in network for network in allowed):
                continue
            if not is_public_address(address):
                # Any private answer refuses the host: a rebinding name may give both kinds.
                raise Refused(f"{host} resolves to a private or reserved address ({address})")
        return addresses


class _Budget:
    """Response bytes left for this call, shared by every proxied connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.exceeded = False
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        with self._lock:
            self.used += count
            if self.used > self.limit:
                self.exceeded = True
            return not self.exceeded


@dataclass
class EgressProxy:
    """An HTTP proxy on 127.0.0.1 for one call: checks each destination with the policy, then
    connects to the address it checked (pinned), counting response bytes against the budget."""

    policy: EgressPolicy
    max_bytes: int
    io_timeout: float
    refusals: list[str] = field(default_factory=list)
    _server: socket.socket | None = None
    _closed: threading.Event = field(default_factory=threading.Event)
    _sockets: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.budget = _Budget(self.max_bytes)

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def start(self) -> None:
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept, name="browser-egress", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        if self._server is not None:
            self._server.close()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        if self._closed.is_set():
            sock.close()
        return sock

    def _accept(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream: socket.socket | None = None
        try:
            client.settimeout(self.io_timeout)
            head, rest = _read_head(client)
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            if method == "CONNECT":
                host, _, port_text = target.rpartition(":")
                port, url = int(port_text), f"https://{target}"
            else:
                parts = urlsplit(target)
                if parts.scheme != "http" or not parts.hostname:
                    raise Refused(f"the proxy only forwards http URLs, not {target!r}")
                host, port, url = parts.hostname, parts.port or 80, target
            try:
                addresses = self.policy.check_host(host)
            except Refused as exc:
                self.refusals.append(f"{url}: {exc}")
                logger.info("browser refused %s: %s", url, exc)
                body = str(exc).encode()
                client.sendall(
                    b"HTTP/1.1 403 Forbidden\r\n"
                    + f"{REFUSED_HEADER}: 1\r\nContent-Type: text/plain\r\n".encode()
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                return
            upstream = self._track(self._connect(addresses, port))
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:
                path = parts.path or "/"
                if parts.query:
                    path += "?" + parts.query
                hop = {"connection", "proxy-connection", "keep-alive", "proxy-authorization"}
                headers = [
                    line
                    for line in lines[1:]
                    if line and line.split(":", 1)[0].strip().lower() not in hop
                ]
                request = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close"])
                upstream.sendall(request.encode("latin-1") + b"\r\n\r\n" + rest)
            self._relay(client, upstream)
        except (OSError, ValueError, Refused):
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _connect(self, addresses: list[IPAddress], port: int) -> socket.socket:
        error: OSError | None = None
        for address in addresses:
            try:
                return socket.create_connection((str(address), port), timeout=self.io_timeout)
            except OSError as exc:
                error = exc
        raise error or OSError("no address")

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        while not self._closed.is_set():
            readable, _, _ = select.select(list(peers), [], [], self.io_timeout)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is upstream and not self.budget.take(len(data)):
                    return
                peers[sock].sendall(data)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(8192)
        if not chunk or len(data) > 65536:
            raise ValueError("bad request head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


Launcher = Callable[[BrowserSettings], contextlib.AbstractContextManager["Browser"]]


@contextlib.contextmanager
def launch_chromium(settings: BrowserSettings) -> Iterator[Browser]:
    """A chromium of its own for one call (it starts in about half a second)."""
    import os

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The worker may preload OpenBLAS for MLX; chromium must not inherit that.
        env: dict[str, str | float | bool] = {
            k: v for k, v in os.environ.items() if k != "LD_PRELOAD"
        }
        browser = playwright.chromium.launch(
            executable_path=settings.executable_path, args=list(CHROMIUM_ARGS), env=env
        )
        try:
            yield browser
        finally:
            browser.close()


_READABLE_JS = """() => {
  const root = document.querySelector('main, article, [role=main]') || document.body;
  const text = root ? root.innerText : '';
  const links = [];
  const seen = new Set();
  for (const a of document.querySelectorAll('a[href]')) {
    const href = a.href;
    if (!/^https?:/i.test(href) || seen.has(href)) continue;
    seen.add(href);
    links.push([href, (a.innerText || a.title || '').trim().replace(/\\s+/g, ' ').slice(0, 120)]);
  }
  return {title: document.title || '', text: text || '', links: links};
}"""


@dataclass(frozen=True)
class _Page:
    url: str
    title: str
    text: str
    links: list[tuple[str, str]]
    blocked: list[str]


class _Failure(Exception):
    pass


@dataclass
class BrowserTool:
    """One of the four browser tools; `kind` is fetch, find, follow or screenshot."""

    name: str
    description: str
    parameters: dict[str, Any]
    kind: str
    settings: BrowserSettings
    launcher: Launcher = launch_chromium
    mutating: bool = False

    def availability(self) -> str | None:
        path = self.settings.executable_path
        if not (Path(path).is_file() or shutil.which(path)):
            return f"the web browser needs chromium at {path} (Debian: apt install chromium)"
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            return "the web browser needs the playwright package"
        return None

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        # An injected launcher's browser belongs to its caller's thread (Playwright's greenlets);
        # our own chromium can start on a fresh thread when this one runs an asyncio loop.
        if self.launcher is launch_chromium and _loop_running():
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(self._run, arguments, context).result()
        return self._run(arguments, context)

    def _run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        why = self.availability()
        if why:
            return _failed(why)
        url = arguments.get("url") if isinstance(arguments, dict) else None
        if not isinstance(url, str) or not url.strip() or len(url) > 4096:
            return _failed("`url` must be an http(s) URL")
        url = url.strip()
        policy = EgressPolicy(self.settings)
        try:
            policy.check_url(url)
        except Refused as exc:
            return _failed(f"refused: {exc}", url=url)
        query = arguments.get("query")
        link = arguments.get("link")
        if self.kind == "find" and (not isinstance(query, str) or not query.strip()):
            return _failed("`query` must be a non-empty string")
        if self.kind == "follow" and (
            not isinstance(link, int) or isinstance(link, bool) or link < 1
        ):
            return _failed("`link` must be a link's number (1 or more) from browser_fetch")
        if context.cancelled():
            return _failed("stopped")
        budget = min(self.settings.max_call_seconds, context.timeout)
        try:
            return self._browse(url, policy, context, time.monotonic() + budget, query, link)
        except _Failure as exc:
            return _failed(str(exc), url=url)
        except Exception as exc:  # the tool never raises for its own failures
            logger.warning("browser %s failed on %s: %s", self.name, url, exc)
            return _failed(f"the browser failed: {_short_error(exc)}", url=url)

    def _browse(
        self,
        url: str,
        policy: EgressPolicy,
        context: ToolContext,
        deadline: float,
        query: Any,
        link: Any,
    ) -> ToolResult:
        settings = self.settings
        proxy = EgressProxy(policy, settings.max_page_bytes, settings.navigation_timeout)
        proxy.start()
        try:
            with self.launcher(settings) as browser:
                browser_context = browser.new_context(
                    accept_downloads=False,
                    service_workers="block",
                    java_script_enabled=True,
                    viewport={"width": settings.viewport_width, "height": settings.viewport_height},
                    # <-loopback> removes chromium's implicit bypass of localhost.
                    proxy={"server": proxy.address, "bypass": "<-loopback>"},
                )
                try:
                    return self._in_context(
                        browser_context, proxy, policy, url, context, deadline, query, link
                    )
                finally:
                    browser_context.close()
        finally:
            proxy.close()

    def _in_context(
        self,
        browser_context: BrowserContext,
        proxy: EgressProxy,
        policy: EgressPolicy,
        url: str,
        context: ToolContext,
        deadline: float,
        query: Any,
        link: Any,
    ) -> ToolResult:
        blocked: list[str] = []

        def guard(route: Route) -> None:
            request_url = route.request.url
            if context.cancelled() or time.monotonic() > deadline:
                route.abort("aborted")
                return
            try:
                policy.check_url(request_url)
            except Refused as exc:
                blocked.append(f"{request_url}: {exc}")
                route.abort("blockedbyclient")
                return
            route.continue_()

        browser_context.route("**/*", guard)
        # A reader has no use for websockets; refused before any connection.
        browser_context.route_web_socket(re.compile(".*"), lambda ws: ws.close())
        page = browser_context.new_page()
        page.set_default_timeout(self.settings.navigation_timeout * 1000)

        loaded = self._load(page, url, proxy, blocked, context, deadline)
        if self.kind == "follow":
            if link > len(loaded.links):
                raise _Failure(f"the page has {len(loaded.links)} links; there is no link {link}")
            target = loaded.links[link - 1][0]
            try:
                policy.check_url(target)
            except Refused as exc:
                raise _Failure(f"refused: {exc}") from None
            loaded = self._load(page, target, proxy, blocked, context, deadline)
        if self.kind == "screenshot":
            return self._screenshot(page, loaded, context)
        if self.kind == "find":
            return self._find(loaded, query)
        return self._readable(loaded)

    @staticmethod
    def _wait_for_load(
        page: Page, proxy: EgressProxy, context: ToolContext, deadline: float
    ) -> None:
        """Wait for the page's load event in short slices, so that a page cut off at the byte
        budget or a stop ends the wait at once: chromium keeps waiting for a page whose
        connection the proxy closed mid-body."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        while not (proxy.budget.exceeded or context.cancelled()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Timeout waiting for the page to load")
            try:
                page.wait_for_load_state("load", timeout=min(250.0, left * 1000))
                return
            except PlaywrightTimeout:
                continue

    def _load(
        self,
        page: Page,
        url: str,
        proxy: EgressProxy,
        blocked: list[str],
        context: ToolContext,
        deadline: float,
    ) -> _Page:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure("timed out")
        timeout = min(self.settings.navigation_timeout, remaining)
        refused_before = len(proxy.refusals)
        try:
            response = page.goto(url, wait_until="commit", timeout=timeout * 1000)
            self._wait_for_load(page, proxy, context, time.monotonic() + timeout)
        except Exception as exc:
            message = str(exc)
            if context.cancelled():
                raise _Failure("stopped") from None
            if proxy.budget.exceeded:
                raise _Failure(_too_large(self.settings)) from None
            if "Download is starting" in message or "download" in message.lower():
                raise _Failure("downloads are refused") from None
            refusals = proxy.refusals[refused_before:] + blocked
            if refusals:
                raise _Failure(f"refused: {refusals[0]}") from None
            if "Timeout" in message:
                raise _Failure(f"timed out after {timeout:.0f} s loading {url}") from None
            raise _Failure(f"could not load {url}: {_short_error(exc)}") from None
        if response is not None and response.headers.get(REFUSED_HEADER.lower()):
            refusals = proxy.refusals[refused_before:]
            raise _Failure(f"refused: {refusals[-1] if refusals else response.url}")
        if proxy.budget.exceeded:
            raise _Failure(_too_large(self.settings))
        if context.cancelled():
            raise _Failure("stopped")
        content = page.evaluate(_READABLE_JS)
        links = [(str(h), str(t)) for h, t in content["links"]][: self.settings.max_links]
        return _Page(
            url=page.url,
            title=str(content["title"])[:300],
            text=_tidy(str(content["text"])),
            links=links,
            blocked=[*blocked, *proxy.refusals],
        )

    def _readable(self, loaded: _Page) -> ToolResult:
        limit = self.settings.max_text_chars
        link_lines = [
            f"[{i}] {text or '(no text)'} <{href}>"
            for i, (href, text) in enumerate(loaded.links, 1)
        ]
        links_text = "\n".join(link_lines)
        header = f"# {loaded.title}\nURL: {loaded.url}\n\n"
        body = loaded.text
        # The text gets what the header and up to a third of the budget for links leave.
        room_for_links = min(len(links_text), limit // 3)
        room_for_text = max(0, limit - len(header) - room_for_links - 40)
        if len(body) > room_for_text:
            body = body[:room_for_text] + "\n[… text truncated]"
        text = header + body
        if links_text:
            text += "\n\nLinks:\n" + links_text
        return ToolResult(ok=True, text=text[:limit], data=_data(loaded))

    def _find(self, loaded: _Page, query: str) -> ToolResult:
        needle = query.strip().lower()
        passages = [p for p in re.split(r"\n\s*\n|\n", loaded.text) if needle in p.lower()]
        passages = passages[: self.settings.max_find_passages]
        per = max(100, self.settings.max_text_chars // max(1, len(passages)) - 10)
        if not passages:
            text = f"No passage of {loaded.url} contains {query!r}."
        else:
            text = (
                f"{len(passages)} passage(s) of {loaded.url} contain {query!r}:\n\n"
                + "\n\n".join(f"- {p.strip()[:per]}" for p in passages)
            )
        data = {**_data(loaded), "query": query, "matches": len(passages)}
        return ToolResult(ok=True, text=text[: self.settings.max_text_chars], data=data)

    def _screenshot(self, page: Page, loaded: _Page, context: ToolContext) -> ToolResult:
        folder = context.workspace / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"screenshot-{uuid.uuid4().hex[:12]}.png"
        path = folder / name
        page.screenshot(path=str(path), full_page=False, type="png")
        text = f"Screenshot of {loaded.url} ({loaded.title or 'untitled'}) saved as {name}."
        return ToolResult(
            ok=True,
            text=text,
            data={**_data(loaded), "file": name},
            files=(ToolFile(name=name, mime="image/png", path=path),),
        )


def _loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _tidy(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _data(loaded: _Page) -> dict[str, Any]:
    return {
        "url": loaded.url,
        "title": loaded.title,
        "links": len(loaded.links),
        "blocked": loaded.blocked[:20],
    }


def _too_large(settings: BrowserSettings) -> str:
    return f"the page is larger than the {settings.max_page_bytes:,} bytes allowed"


def _short_error(exc: Exception) -> str:
    return str(exc).strip().split("\n", 1)[0][:300]


def _failed(message: str, **data: Any) -> ToolResult:
    return ToolResult(ok=False, text=f"Error: {message}", error=message, data=data)


def _schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_URL = {"type": "string", "description": "An http(s) URL."}


def tools(settings: BrowserSettings, *, launcher: Launcher = launch_chromium) -> list[Tool]:
    """The four browser tools; `launcher` lets tests share one chromium across calls."""

    def make(name: str, kind: str, description: str, properties: dict[str, Any]) -> BrowserTool:
        return BrowserTool(
            name=name,
            description=description,
            parameters=_schema(properties),
            kind=kind,
            settings=settings,
            launcher=launcher,
        )

    return [
        make(
            "browser_fetch",
            "fetch",
            "Fetch a web page and return its title, readable text and numbered links.",
            {"url": _URL},
        ),
        make(
            "browser_find",
            "find",
            "Fetch a web page and return the passages that contain the query (case-insensitive).",
            {"url": _URL, "query": {"type": "string", "description": "Text to look for."}},
        ),
        make(
            "browser_follow",
            "follow",
            "Open a page, follow its link number `link` (as browser_fetch numbers them) and "
            "return the linked page's readable text.",
            {"url": _URL, "link": {"type": "integer", "minimum": 1}},
        ),
        make(
            "browser_screenshot",
            "screenshot",
            "Take a screenshot of a web page (shown to the user as an image).",
            {"url": _URL},
        ),
    ]
