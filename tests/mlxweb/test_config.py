"""configs/ validation: a bad file names the file, the key and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlxweb.config import DEFAULT_CONFIG_DIR, ConfigError, load_config
from tests.live import ROOT

MODEL = """\
name: Test model
source:
  path: test-model
context_length: 2048
"""


def _configs(
    tmp_path: Path, server: str = "default_model: test-model\n", model: str = MODEL
) -> Path:
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "server.yaml").write_text(server)
    (tmp_path / "models" / "test-model.yaml").write_text(model)
    return tmp_path


def test_it_loads_the_shipped_configs() -> None:
    config = load_config(DEFAULT_CONFIG_DIR, environ={})
    assert config.server.default_model == "smollm2-135m-instruct"
    assert {"smollm2-135m-instruct", "llama-3-8b", "mistral-7b", "tinyllama-1.1b"} <= set(
        config.models
    )
    default = config.models["smollm2-135m-instruct"]
    assert default.source.kind == "gguf" and default.source.fetch is not None
    assert config.models["llama-3-8b"].source.hub == "mlx-community/Meta-Llama-3-8B-Instruct-4bit"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (
            "default_model: test-model\nport: 70000\n",
            "server.yaml (or its MLXWEB_* overrides): port:",
        ),
        ("default_model: test-model\nlimits:\n  max_new_tokens: 0\n", "limits.max_new_tokens:"),
        ("default_model: test-model\nsurprise: 1\n", "surprise: Extra inputs are not permitted"),
        ("default_model: test-model\ndatabase_url: mysql://x\n", "database_url must start with"),
        ("default_model: nope\n", "default_model: 'nope' has no file"),
        ("default_model: [1\n", "server.yaml: not valid YAML"),
        ("- a list\n", "the top level must be a mapping"),
    ],
)
def test_it_names_the_file_key_and_reason(tmp_path: Path, server: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        load_config(_configs(tmp_path, server=server), environ={})
    assert message in str(error.value)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (MODEL.replace("context_length: 2048", "context_length: 1"), "context_length:"),
        (MODEL.replace("path: test-model", "path: ../../etc"), "relative path inside models_dir"),
        (MODEL.replace("path: test-model", "path: /etc"), "relative path inside models_dir"),
        (MODEL.replace("  path: test-model", "  path: a\n  hub: org/repo"), "exactly one of"),
        (MODEL + "sampling:\n  temperature: 5\n", "sampling.temperature:"),
        ("id: other\n" + MODEL, "id: must match the file name"),
    ],
)
def test_it_rejects_bad_model_files(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(_configs(tmp_path, model=model), environ={})
    assert message in str(error.value)
    assert "test-model.yaml" in str(error.value)


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    config = load_config(
        _configs(tmp_path),
        environ={
            "MLXWEB_PORT": "9001",
            "MLXWEB_REDIS_URL": "redis://127.0.0.1:6379/3",
            "MLXWEB_ALLOW_SIGNUP": "false",
            "MLXWEB_MAX_NEW_TOKENS": "77",
        },
    )
    assert config.server.port == 9001
    assert config.server.redis_url == "redis://127.0.0.1:6379/3"
    assert config.server.allow_signup is False
    assert config.server.limits.max_new_tokens == 77


def test_it_reads_the_library_settings_from_the_file_and_the_environment(
    tmp_path: Path,
) -> None:
    server = "default_model: test-model\nlibrary:\n  import_dirs: [/srv/gguf]\n"
    config = load_config(_configs(tmp_path, server=server), environ={})
    assert config.server.library.import_dirs == (Path("/srv/gguf"),)
    assert config.server.library.max_upload_bytes == 16 * 1024**3

    config = load_config(
        _configs(tmp_path),
        environ={"MLXWEB_IMPORT_DIRS": "/a:/b", "MLXWEB_MAX_UPLOAD_BYTES": "2000000"},
    )
    assert config.server.library.import_dirs == (Path("/a"), Path("/b"))
    assert config.server.library.max_upload_bytes == 2_000_000
    with pytest.raises(ConfigError, match="library.max_upload_bytes"):
        load_config(_configs(tmp_path), environ={"MLXWEB_MAX_UPLOAD_BYTES": "10"})


def test_a_bad_environment_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MLXWEB_\\* overrides\\): port"):
        load_config(_configs(tmp_path), environ={"MLXWEB_PORT": "eighty"})


def test_the_server_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    configs = _configs(tmp_path, server="default_model: test-model\nport: -1\n")
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "MLXWEB_CONFIG_DIR": str(configs),
            "MLXWEB_VAR_DIR": str(tmp_path / "var"),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "the configuration is invalid" in result.stderr
    assert "port: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr
