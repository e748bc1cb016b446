"""A live `manage.py serve` with its gRPC server on a Unix socket and localhost TCP, shared by
the session: the tiny model, the embedding model and two users' API keys."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlxweb.client import Client
from tests.api.conftest import EMBED_MODEL, minilm_dir  # noqa: F401
from tests.support.live import Site, api_site, free_port
from tests.support.waiting import wait_until

PASSWORD = "a-long-pass-phrase"


@dataclass
class LiveGrpc:
    """The running site, where its gRPC server listens, and ada's and bob's keys."""

    site: Site
    socket: Path
    tcp_port: int
    key: str  # ada's
    other_key: str  # bob's

    @property
    def unix_target(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_target(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    def client(self, *, key: str | None = None, tcp: bool = False) -> Client:
        return Client(self.tcp_target if tcp else self.unix_target, api_key=key or self.key)

    def generation(self, code: str) -> tuple[str, str, str]:
        """(state, finish_reason, text) of a generation row."""
        with sqlite3.connect(self.site.env["MLXWEB_DATABASE_URL"].removeprefix("sqlite:///")) as db:
            row = db.execute(
                "SELECT state, finish_reason, text FROM inference_generation WHERE code = ?",
                (code.replace("-", ""),),
            ).fetchone()
        assert row is not None, f"no generation {code}"
        return row[0], row[1], row[2]

    def wait_ended(self, code: str) -> tuple[str, str, str]:
        def ended() -> tuple[str, str, str] | None:
            row = self.generation(code)
            return row if row[0] not in ("queued", "streaming") else None

        return wait_until(ended, timeout=60, what=f"generation {code} to end")


@pytest.fixture(scope="session")
def live_grpc(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    minilm_dir: Path,  # noqa: F811
) -> Iterator[LiveGrpc]:
    root = tmp_path_factory.mktemp("grpc-site")
    tcp_port = free_port()
    site = api_site(
        root,
        tiny_model_dir=tiny_model_dir,
        embed_model=EMBED_MODEL,
        embed_dir=minilm_dir,
        users={"ada": False, "bob": False},
        password=PASSWORD,
        env={
            "MLXWEB_SECRET_KEY": "grpc-test",
            "MLXWEB_GRPC_TCP_PORT": str(tcp_port),
            "MLXWEB_API_REQUESTS_PER_MINUTE": "100000",
            "MLXWEB_API_MAX_CONCURRENT_STREAMS": "2",
        },
    )

    def new_key(user: str) -> str:
        return site.manage("api_keys", "create", "--user", user, "--name", "grpc").split()[-1]

    live = LiveGrpc(
        site=site,
        socket=root / "var" / "grpc.sock",
        tcp_port=tcp_port,
        key=new_key("ada"),
        other_key=new_key("bob"),
    )
    site.serve()
    try:
        with live.client() as client:
            wait_until(client.is_serving, timeout=60, what="the gRPC server")
        yield live
    finally:
        site.stop_all()
