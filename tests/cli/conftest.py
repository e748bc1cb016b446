"""The `mlxweb` command run in this process (`mlxweb.cli.main(argv)`), with the library's
fixtures (tests/models_admin) and the tiny model in the catalogue."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlxweb.cli import main
from tests.models_admin.conftest import (  # noqa: F401  (fixtures, shared with the library tests)
    enqueued,
    fake_hub,
    hf_cache,
    library,
    running_job,
    tiny_files,
    tiny_hf_dir,
)

ROOT = Path(__file__).resolve().parents[2]
MLXWEB = Path(sys.executable).parent / "mlxweb"


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `mlxweb ARGS` here; its exit status and what it wrote."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def tiny_chat(models_root: Path, tiny_model_dir: Path) -> Iterator[str]:
    """The tiny model in the catalogue as `tiny`; the engine that `run` starts is stopped after."""
    from inference import worker

    (models_root / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    yield "tiny"
    worker.stop_engine()
