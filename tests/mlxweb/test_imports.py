"""The engine path imports without the project: no Django, no Celery, no mlxweb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import inference.catalogue, inference.config, inference.engine, inference.loader
import inference.schemas
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"django", "celery", "mlxweb"})))
"""


def test_the_engine_imports_without_django_celery_or_mlxweb() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == []


def test_the_project_config_imports_without_django_or_celery() -> None:
    probe = "import json, sys, mlxweb.config; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'celery'})))"  # noqa: E501
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == []
