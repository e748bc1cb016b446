"""The `grpc` section of configs/server.yaml and its MLXWEB_GRPC_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxweb.client import default_target
from mlxweb.config import BASE_DIR, DEFAULT_CONFIG_DIR, ConfigError, load_config


def test_it_listens_on_a_socket_in_the_data_folder_by_default() -> None:
    grpc = load_config(DEFAULT_CONFIG_DIR, environ={}).server.grpc

    assert grpc.enabled and grpc.tcp_port is None
    assert grpc.socket_path(Path("/srv/var")) == Path("/srv/var/grpc.sock")


def test_it_takes_the_socket_and_port_from_the_environment() -> None:
    environ = {
        "MLXWEB_GRPC_SOCKET": "run/mlxweb.sock",
        "MLXWEB_GRPC_TCP_PORT": "50051",
        "MLXWEB_GRPC_ENABLED": "false",
    }
    grpc = load_config(DEFAULT_CONFIG_DIR, environ=environ).server.grpc

    assert not grpc.enabled and grpc.tcp_port == 50051
    assert grpc.socket_path(Path("/srv/var")) == BASE_DIR / "run" / "mlxweb.sock"


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_it_refuses_a_port_that_is_not_one(port: str) -> None:
    with pytest.raises(ConfigError, match=r"grpc\.tcp_port.*MLXWEB_GRPC_TCP_PORT"):
        load_config(DEFAULT_CONFIG_DIR, environ={"MLXWEB_GRPC_TCP_PORT": port})


def test_the_client_finds_the_configured_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXWEB_VAR_DIR", "/srv/mlxweb")
    monkeypatch.delenv("MLXWEB_GRPC_SOCKET", raising=False)

    assert default_target() == "unix:///srv/mlxweb/grpc.sock"
    assert default_target(Path("/elsewhere")) == "unix:///elsewhere/grpc.sock"
