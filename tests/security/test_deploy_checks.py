"""`manage.py check --deploy`: clean in production mode (behind a TLS proxy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FINDINGS = ("security.W004", "security.W008", "security.W012", "security.W016")


def _check_deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "MLXWEB_VAR_DIR": str(tmp_path / "var"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_production_mode_passes_the_deploy_checks(tmp_path: Path) -> None:
    result = _check_deploy(tmp_path, MLXWEB_PRODUCTION="1", MLXWEB_ALLOWED_HOSTS="chat.example.org")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
    for finding in FINDINGS:
        assert finding not in result.stdout + result.stderr


def test_local_mode_still_names_what_production_mode_fixes(tmp_path: Path) -> None:
    result = _check_deploy(tmp_path)
    for finding in FINDINGS:
        assert finding in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("SECURE_SSL_REDIRECT", True),
        ("SESSION_COOKIE_SECURE", True),
        ("CSRF_COOKIE_SECURE", True),
        ("SECURE_PROXY_SSL_HEADER", ["HTTP_X_FORWARDED_PROTO", "https"]),
        ("SECURE_HSTS_SECONDS", 31536000),
    ],
)
def test_production_mode_trusts_the_proxy_for_https(
    tmp_path: Path, setting: str, expected: object
) -> None:
    probe = f"import json; from django.conf import settings; print(json.dumps(settings.{setting}))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
            "MLXWEB_PRODUCTION": "true",
            "MLXWEB_SECRET_KEY": "s" * 50,
            "MLXWEB_VAR_DIR": str(tmp_path / "var"),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == expected


def test_production_mode_will_not_run_with_debug(tmp_path: Path) -> None:
    result = _check_deploy(tmp_path, MLXWEB_PRODUCTION="1", MLXWEB_DEBUG="1")
    assert result.returncode == 2
    assert "debug and production cannot both be on" in result.stderr
    assert "Traceback" not in result.stderr
