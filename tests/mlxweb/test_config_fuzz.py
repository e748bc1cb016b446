"""Config loading under generated input: always ConfigError or a Config, never a traceback.

A short run is part of the suite; the long run:
    MLXWEB_FUZZ_EXAMPLES=5000 ./scripts/test tests/mlxweb/test_config_fuzz.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxweb.config import ENV_OVERRIDES, Config, ConfigError, load_config

# Per test, not a global profile, so the other fuzz tests of the session keep their own counts.
FUZZ = settings(
    max_examples=int(os.environ.get("MLXWEB_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

MODEL = "name: Test model\nsource:\n  path: test-model\ncontext_length: 2048\n"
KEYS = sorted({dotted.split(".")[0] for dotted in ENV_OVERRIDES.values()} | {"default_model"})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
env_values = st.one_of(
    st.text(max_size=30).filter(lambda s: "\x00" not in s),
    st.sampled_from(["maybe", "[", "{a: [", "-1", "1e999", "!!python/object:os.system", "~", "''"]),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(min_value=1, max_value=2000)),
)


def _load(server_text: bytes | str, environ: dict[str, str], model: str = MODEL) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        configs = Path(tmp)
        (configs / "models").mkdir()
        server = configs / "server.yaml"
        if isinstance(server_text, bytes):
            server.write_bytes(server_text)
        else:
            server.write_text(server_text)
        (configs / "models" / "test-model.yaml").write_text(model)
        try:
            config = load_config(configs, environ=environ)
        except ConfigError as e:
            assert str(e)  # a message, naming what was wrong
        else:
            assert isinstance(config, Config)


@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
@FUZZ
def test_any_server_mapping_is_loaded_or_refused_cleanly(data: dict[str, object]) -> None:
    data.setdefault("default_model", "test-model")
    _load(yaml.safe_dump(data), {})


@given(st.binary(max_size=400))
@FUZZ
def test_any_bytes_as_server_yaml_are_refused_cleanly(raw: bytes) -> None:
    _load(raw, {})


@given(st.text(max_size=400))
@FUZZ
def test_any_text_as_a_model_file_is_refused_cleanly(text: str) -> None:
    _load("default_model: test-model\n", {}, model=text)


@given(st.dictionaries(st.sampled_from(sorted(ENV_OVERRIDES)), env_values, max_size=6))
@FUZZ
def test_any_environment_is_loaded_or_refused_cleanly(environ: dict[str, str]) -> None:
    _load("default_model: test-model\n", environ)


@given(
    st.sampled_from(sorted(ENV_OVERRIDES)),
    env_values,
    st.sampled_from(["limits: 3", "login: []", "hub: x", ""]),
)
@FUZZ
def test_an_override_under_a_key_of_the_wrong_shape_is_refused_cleanly(
    var: str, value: str, server: str
) -> None:
    _load(f"default_model: test-model\n{server}\n", {var: value})


def test_deeply_nested_yaml_is_a_clean_error() -> None:
    _load("default_model: " + "[" * 20000 + "]" * 20000 + "\n", {})
