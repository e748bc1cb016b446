"""mlxweb.client on its own: what it imports, and options it refuses before calling."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from mlxweb.client import Client, ClientError
from tests.support.live import ROOT


def test_it_imports_without_django_or_celery() -> None:
    probe = (
        "import json, sys, mlxweb.client; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'django', 'celery', 'channels', 'mlx'})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    ("params", "named"),
    [({"temprature": 0.5}, "temprature"), ({"top_k": "many"}, "top_k"), ({"seed": 2**70}, "seed")],
)
def test_it_names_an_option_it_cannot_send(params: dict[str, Any], named: str) -> None:
    with Client("127.0.0.1:1", api_key="k") as client, pytest.raises(ClientError) as error:
        next(client.generate(model="tiny", prompt="hi", **params))

    assert error.value.code == "INVALID_ARGUMENT" and str(error.value).startswith(named)


def test_it_takes_a_bare_socket_path_as_a_unix_target() -> None:
    with Client("/run/mlxweb/grpc.sock") as client:
        assert client.target == "unix:///run/mlxweb/grpc.sock"
