"""configs/ validation: a bad file names the file, the key and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlxweb.config import DEFAULT_CONFIG_DIR, ConfigError, load_config
from tests.support.live import ROOT

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


def test_a_bad_debug_value_is_a_clean_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"debug: Input should be a valid boolean.*MLXWEB_DEBUG"):
        load_config(_configs(tmp_path), environ={"MLXWEB_DEBUG": "maybe"})
    configs = _configs(tmp_path)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "MLXWEB_CONFIG_DIR": str(configs),
            "MLXWEB_VAR_DIR": str(tmp_path / "var"),
            "MLXWEB_DEBUG": "maybe",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "the configuration is invalid" in result.stderr
    assert "MLXWEB_DEBUG" in result.stderr
    assert "Traceback" not in result.stderr


def test_it_reads_every_setting_from_the_environment_table(tmp_path: Path) -> None:
    config = load_config(
        _configs(tmp_path),
        environ={
            "MLXWEB_DEBUG": "true",
            "MLXWEB_SECRET_KEY": "k" * 40,
            "MLXWEB_ALLOWED_HOSTS": "chat.example.org, 10.0.0.5",
            "MLXWEB_CSRF_TRUSTED_ORIGINS": "https://chat.example.org",
            "MLXWEB_LOG_LEVEL": "debug",
            "MLXWEB_CELERY_BROKER_URL": "amqp://rabbit//",
            "MLXWEB_INFERENCE_IN_PROCESS": "0",
            "HF_ENDPOINT": "http://127.0.0.1:9/",
            "HF_HOME": "/srv/hf",
        },
    )
    server = config.server
    assert server.debug is True
    assert server.secret_key is not None and server.secret_key.get_secret_value() == "k" * 40
    assert "k" * 40 not in repr(server)
    assert server.allowed_hosts == ("chat.example.org", "10.0.0.5")
    assert server.csrf_trusted_origins == ("https://chat.example.org",)
    assert server.log_level == "DEBUG"
    assert server.celery_broker_url == "amqp://rabbit//"
    assert server.inference_in_process is False
    assert server.hub.endpoint_url == "http://127.0.0.1:9"
    assert server.hub.cache_dir == Path("/srv/hf/hub")
    assert load_config(_configs(tmp_path), environ={"HF_HUB_CACHE": "/c"}).server.hub.cache_dir == (
        Path("/c")
    )


def test_settings_read_no_environment_variable_themselves() -> None:
    source = (ROOT / "mlxweb" / "settings.py").read_text()
    assert "os.environ" not in source and "getenv" not in source


def test_sign_up_is_closed_by_default(tmp_path: Path) -> None:
    assert load_config(_configs(tmp_path), environ={}).server.allow_signup is False
    assert load_config(DEFAULT_CONFIG_DIR, environ={}).server.allow_signup is False


_SETTINGS_PROBE = """
import json
from django.conf import settings
print(json.dumps({
    "database": str(settings.DATABASES["default"]["NAME"]),
    "models": str(settings.MLXWEB_MODELS_DIR),
    "converted": str(settings.MLXWEB_CONVERTED_DIR),
    "celery": settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"],
    "spool": settings.FILE_UPLOAD_TEMP_DIR,
    "static": str(settings.STATIC_ROOT),
    "secret_key": settings.SECRET_KEY,
}))
"""


def _settings_in(env: dict[str, str]) -> dict[str, str]:
    import json

    result = subprocess.run(
        [sys.executable, "-c", _SETTINGS_PROBE],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "mlxweb.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(result.stdout))


def test_the_var_dir_moves_everything_under_it(tmp_path: Path) -> None:
    configs = _configs(tmp_path / "configs")
    seen = []
    for name in ("one", "two"):
        var = tmp_path / name
        env = {"MLXWEB_CONFIG_DIR": str(configs), "MLXWEB_VAR_DIR": str(var)}
        # The launcher prepares the folder and the key; importing settings writes nothing.
        probe = _settings_in(env)
        assert not var.exists()
        subprocess.run(
            [sys.executable, "manage.py", "check"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        assert (var / "secret_key").stat().st_mode & 0o777 == 0o600
        probe = _settings_in(env)
        for key in ("database", "models", "converted", "celery", "spool", "static"):
            assert Path(probe[key]).is_relative_to(var), (key, probe[key])
        # Every process started on this folder signs sessions with the same key.
        assert probe["secret_key"] == (var / "secret_key").read_text().strip()
        assert _settings_in(env)["secret_key"] == probe["secret_key"]
        seen.append(probe)
    assert seen[0]["database"] != seen[1]["database"]
    assert seen[0]["secret_key"] != seen[1]["secret_key"]

    # A part set on its own stays where it was put.
    env = {
        "MLXWEB_CONFIG_DIR": str(configs),
        "MLXWEB_VAR_DIR": str(tmp_path / "one"),
        "MLXWEB_MODELS_DIR": str(tmp_path / "shared-models"),
        "MLXWEB_DATABASE_URL": f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}",
    }
    probe = _settings_in(env)
    assert probe["models"] == str(tmp_path / "shared-models")
    assert probe["database"] == str(tmp_path / "elsewhere.sqlite3")
    assert Path(probe["converted"]).is_relative_to(tmp_path / "one")
