"""The KV cache settings in configs/: prompt_cache (kv_bits, kv_group_size, max_kv_size),
kv_persistence, and a model's own kv settings reaching the catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.catalogue import Catalogue
from mlxweb.config import DEFAULT_CONFIG_DIR, ConfigError, load_config

MODEL = """\
name: Test model
source:
  path: test-model
context_length: 2048
"""


def _configs(tmp_path: Path, server: str = "", model: str = MODEL) -> Path:
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "server.yaml").write_text("default_model: test-model\n" + server)
    (tmp_path / "models" / "test-model.yaml").write_text(model)
    return tmp_path


def test_persistence_is_on_by_default_and_the_shipped_file_says_so() -> None:
    shipped = load_config(DEFAULT_CONFIG_DIR, environ={}).server
    assert shipped.kv_persistence.enabled is True
    assert shipped.kv_persistence.dir is None  # var_dir/kvcache
    assert shipped.prompt_cache.kv_bits is None and shipped.prompt_cache.max_kv_size is None


def test_the_environment_turns_persistence_off_and_moves_it(tmp_path: Path) -> None:
    config = load_config(
        _configs(tmp_path),
        environ={
            "MLXWEB_KV_PERSISTENCE": "false",
            "MLXWEB_KV_PERSISTENCE_DIR": "/srv/kv",
            "MLXWEB_KV_PERSISTENCE_BYTES": "1000000",
        },
    )
    assert config.server.kv_persistence.enabled is False
    assert config.server.kv_persistence.dir == Path("/srv/kv")
    assert config.server.kv_persistence.max_bytes == 1_000_000


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("prompt_cache:\n  kv_bits: 3\n", "kv_bits"),
        ("prompt_cache:\n  kv_group_size: 48\n", "kv_group_size"),
        ("prompt_cache:\n  max_kv_size: 10\n", "max_kv_size"),
        ("prompt_cache:\n  kv_bits: 8\n  max_kv_size: 1024\n", "cannot both be set"),
        ("kv_persistence:\n  max_bytes: -1\n", "max_bytes"),
        ("kv_persistence:\n  folder: x\n", "folder"),
    ],
)
def test_bad_kv_settings_are_refused_with_the_key(
    tmp_path: Path, server: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(_configs(tmp_path, server=server), environ={})


def test_a_models_own_kv_settings_reach_its_spec(tmp_path: Path) -> None:
    model = MODEL + "kv_bits: 8\nkv_group_size: 32\n"
    config = load_config(_configs(tmp_path, model=model), environ={})
    spec = Catalogue(config, tmp_path / "models-dir").get("test-model")
    assert (spec.kv_bits, spec.kv_group_size, spec.max_kv_size) == (8, 32, None)

    both = MODEL + "kv_bits: 4\nmax_kv_size: 2048\n"
    with pytest.raises(ConfigError, match="cannot both be set"):
        load_config(_configs(tmp_path, model=both), environ={})
