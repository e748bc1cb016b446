"""inference.weights stands alone: importing it pulls in neither Django, Celery nor the project,
and its reader and inspector not even mlx (the web process reads GGUF headers on page views)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
NEVER = ["django", "celery", "mlxweb", "chat", "models_admin"]


def _imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in result.stdout.split()}


@pytest.mark.parametrize(
    "module",
    [
        "inference.weights",
        "inference.weights.gguf",
        "inference.weights.inspect",
        "inference.weights.convert",
        "inference.weights.quantize",
        "inference.weights.fetch",
        "inference.weights.evaluation",
        "inference.weights.progress",
    ],
)
def test_it_imports_without_django_celery_or_the_project(module: str) -> None:
    imported = _imported_after(module)
    assert not imported & set(NEVER)


@pytest.mark.parametrize("module", ["inference.weights.gguf", "inference.weights.inspect"])
def test_the_reader_and_the_inspector_do_not_import_mlx(module: str) -> None:
    assert not _imported_after(module) & {"mlx", "mlx_lm", "transformers", "torch"}
