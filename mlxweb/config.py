"""The YAML files under configs/, validated with pydantic.

`configs/server.yaml` holds the server's settings and `configs/models/*.yaml` one known model each
(their schema lives in `inference.config`, which the engine reads without the project).
Environment variables override the server file (see `ENV_OVERRIDES`); this module is the only one
that reads them for settings. A bad file or variable stops the server with a message naming the
file or variable, the key and the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The model schemas are the inference app's (its engine imports them without the project).
from inference.config import KeepAlive, ModelConfig, ModelId, SchedulerSettings
from inference.config import StrictSchema as _Strict

__all__ = [
    "BASE_DIR",
    "DEFAULT_CONFIG_DIR",
    "Config",
    "ConfigError",
    "ServerConfig",
    "ToolsSettings",
    "load_config",
]

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_DIR = BASE_DIR / "configs"


class ConfigError(Exception):
    """A config file is missing, unreadable or invalid; the message says where and why."""


class Limits(_Strict):
    """Bounds on what one request or socket may ask of the server."""

    max_concurrent_streams: int = Field(8, ge=1, le=256)
    max_prompt_tokens: int = Field(8192, ge=16, le=1_048_576)
    max_new_tokens: int = Field(2048, ge=1, le=131_072)
    ws_max_message_bytes: int = Field(65_536, ge=1024, le=16 * 1024 * 1024)
    # Per user: replies waiting to start (more are refused) and replies streaming at once (the
    # rest wait their turn, users taking turns).
    max_queued_replies_per_user: int = Field(8, ge=1, le=10_000)
    max_streaming_replies_per_user: int = Field(4, ge=1, le=256)
    # All users together: replies waiting to start; past it new ones are refused (HTTP 503).
    max_queued_replies: int = Field(256, ge=1, le=100_000)
    # HTTP request bodies, enforced while they are read (mlxweb.bodylimit): anonymous requests
    # (sign-in, sign-up) get the smallest; signed-in ones enough for the composer's 100,000
    # characters; the GGUF upload route gets library.max_upload_bytes.
    anonymous_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    body_bytes: int = Field(2 * 1024 * 1024, ge=64 * 1024, le=1024**3)

    @model_validator(mode="after")
    def _anonymous_is_smallest(self) -> Limits:
        if self.anonymous_body_bytes > self.body_bytes:
            raise ValueError("anonymous_body_bytes must not exceed body_bytes")
        return self


class PromptCacheSettings(_Strict):
    """The prompt-prefix cache that lets the next turn prefill only its new tokens."""

    max_entries: int = Field(16, ge=0, le=10_000)
    max_bytes: int = Field(2 * 1024**3, ge=0)
    # Quantize the KV caches kept between turns (memory and disk) to 4 or 8 bits, in groups of
    # kv_group_size values; null keeps them as computed. A model's config may set its own.
    kv_bits: Literal[4, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = 64
    # A rotating KV cache of this many tokens per sequence (the first 4 and the most recent
    # ones) for long contexts; null keeps every token. Not together with kv_bits.
    max_kv_size: int | None = Field(None, ge=64, le=1_048_576)

    @model_validator(mode="after")
    def _not_both(self) -> PromptCacheSettings:
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise ValueError(
                "kv_bits and max_kv_size cannot both be set (mlx-lm cannot "
                "quantize a rotating cache)"
            )
        return self


class KvPersistenceSettings(_Strict):
    """Conversations' KV caches written to disk when they leave memory, so that reopening a
    conversation (also after a restart) prefills only its new message."""

    enabled: bool = True
    # null: <var_dir>/kvcache. Relative paths are relative to the project root.
    dir: Path | None = None
    # The most the files may take together; the least recently used go first.
    max_bytes: int = Field(4 * 1024**3, ge=0, le=1024**5)


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


class LoginSettings(_Strict):
    """Sign-in throttling (django-axes): per account and per address, a lockout that expires."""

    failure_limit: int = Field(5, ge=1, le=1000)
    lockout_minutes: int = Field(15, ge=1, le=7 * 24 * 60)


class HubSettings(_Strict):
    """The Hugging Face hub and cache, from huggingface_hub's own variables (HF_*)."""

    endpoint: str | None = None
    cache: Path | None = None
    home: Path | None = None
    xdg_cache_home: Path | None = None

    @property
    def cache_dir(self) -> Path:
        """Where huggingface_hub keeps its cache: HF_HUB_CACHE, else HF_HOME/hub."""
        if self.cache is not None:
            return self.cache.expanduser()
        home = self.home or (self.xdg_cache_home or Path.home() / ".cache") / "huggingface"
        return (home / "hub").expanduser()

    @property
    def endpoint_url(self) -> str | None:
        return self.endpoint.rstrip("/") or None if self.endpoint else None


class ApiSettings(_Strict):
    """The OpenAI- and Ollama-compatible HTTP APIs (inference.api): per-key limits and CORS."""

    # Per API key: requests in any one minute (more get 429 with Retry-After) and generations
    # running at once (streamed or not).
    requests_per_minute: int = Field(120, ge=1, le=1_000_000)
    max_concurrent_streams: int = Field(4, ge=1, le=1024)
    # The most choices one request may ask for (`n`); more is a 400.
    max_choices: int = Field(8, ge=1, le=64)
    # Origins whose browser pages may call /v1 and /api ("*": any); empty: none.
    cors_origins: tuple[str, ...] = Field((), max_length=100)
    # Requests from this machine (127.0.0.1, ::1) need no key. Ignored in production mode,
    # where every request comes through the proxy on loopback.
    open_on_loopback: bool = False

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        # MLXWEB_API_CORS_ORIGINS=https://a.example,https://b.example
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value


class GrpcSettings(_Strict):
    """The gRPC service (inference.grpc): a Unix socket under the data folder, optionally TCP."""

    # Whether `manage.py serve` starts it (`manage.py grpc_server` runs it on its own).
    enabled: bool = True
    # None: <var_dir>/grpc.sock. Relative paths are relative to the project root.
    socket: Path | None = None
    # Also listen on 127.0.0.1 at this port; None: the Unix socket only.
    tcp_port: int | None = Field(None, ge=1, le=65535)

    def socket_path(self, var_dir: Path) -> Path:
        """Where the Unix socket is, given the resolved data folder."""
        if self.socket is None:
            return var_dir / "grpc.sock"
        path = self.socket.expanduser()
        return path if path.is_absolute() else BASE_DIR / path


# The tool groups (inference.tools.<group>), in the order their tools are offered.
ToolGroup = Literal["browser", "python", "patch", "mcp"]


def _executor_settings(group: str, value: Any) -> Any:
    # Each executor owns its settings model (inference.tools.<group>); while a module is not there
    # yet its section is kept as written and the registry skips the group.
    from inference.tools.registry import settings_model

    model = settings_model(group)
    if model is None:
        return dict(value or {})
    if isinstance(value, model):
        return value
    return model.model_validate(value or {})


class ToolsSettings(_Strict):
    """`tools:`: what the models may call in chats that turn tools on, and API requests that ask
    for server-side tools (issue 11). Each group's settings are its executor's own model."""

    # Groups offered; a group whose executor is unavailable is skipped.
    enabled: tuple[ToolGroup, ...] = Field(("browser", "python", "patch", "mcp"), max_length=4)
    # Model turns with tool calls in one reply before it must answer without tools.
    max_rounds: int = Field(4, ge=1, le=32)
    # Seconds one tool call may take.
    timeout: float = Field(60.0, gt=0, le=3600)
    # validate_default: a left-out section gets the executor's defaults.
    browser: Any = Field(None, validate_default=True)
    python: Any = Field(None, validate_default=True)
    patch: Any = Field(None, validate_default=True)
    mcp: Any = Field(None, validate_default=True)

    @field_validator("browser", "python", "patch", "mcp", mode="before")
    @classmethod
    def _group_settings(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return _executor_settings(info.field_name, value)

    def settings_for(self, group: str) -> Any:
        """The executor settings for `group` (its pydantic model, or a dict while it is absent)."""
        return getattr(self, group)


class ServerConfig(_Strict):
    """`configs/server.yaml`."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # The data folder: the database, the models folder, converted models, the job queue, upload
    # spool files and the secret key live under it unless set on their own.
    var_dir: Path = Path("var")
    # Left out: sqlite:///<var_dir>/db.sqlite3.
    database_url: str = "sqlite:///var/db.sqlite3"
    redis_url: str | None = None
    default_model: ModelId = "smollm2-135m-instruct"
    # Left out: <var_dir>/models.
    models_dir: Path = Path("var/models")
    # Whether people other than the first (admin) account may create accounts themselves.
    allow_signup: bool = False
    debug: bool = False
    # Behind a TLS-terminating proxy: HTTPS redirects, HSTS, secure cookies (check --deploy).
    production: bool = False
    hsts_seconds: int = Field(365 * 24 * 3600, ge=0, le=2 * 365 * 24 * 3600)
    # None: generated once into var_dir/secret_key by the launcher (manage.py).
    secret_key: SecretStr | None = None
    # Empty: the loopback names and `host`.
    allowed_hosts: tuple[str, ...] = Field((), max_length=100)
    csrf_trusted_origins: tuple[str, ...] = Field((), max_length=100)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # None: redis_url, else kombu's filesystem transport under var_dir/celery.
    celery_broker_url: str | None = None
    # None: in the web process unless redis_url is set.
    inference_in_process: bool | None = None
    login: LoginSettings = LoginSettings()
    hub: HubSettings = HubSettings()
    # A cap on the models loaded at once; within it, the memory budget decides (issue 10).
    max_loaded_models: int = Field(4, ge=1, le=16)
    # The memory budget shared by the models, their KV caches and memory-heavy library jobs
    # (inference.memory): bytes, or None for memory_budget_fraction of what MLX may use (the
    # GPU's recommended working set, or the machine's RAM when MLX runs on the CPU).
    memory_budget_bytes: int | None = Field(None, ge=1)
    memory_budget_fraction: float = Field(0.75, gt=0, le=1)
    # How long a model stays loaded after its last request (seconds, or "5m"; 0: unload at
    # once; None or negative: keep it until evicted). A model's own keep_alive comes first.
    keep_alive: KeepAlive = None
    # Without a GPU, models whose float32 weights fit in this many bytes are served in float32
    # (quantized MLX matmuls are scalar loops on x86; float32 uses BLAS). 0: always as stored.
    cpu_float32_max_bytes: int = Field(2 * 1024**3, ge=0)
    limits: Limits = Limits()
    prompt_cache: PromptCacheSettings = PromptCacheSettings()
    kv_persistence: KvPersistenceSettings = KvPersistenceSettings()
    batch: BatchSettings = BatchSettings()
    # Chunked prefill, priorities, speculative decoding (inference.config.SchedulerSettings).
    scheduler: SchedulerSettings = SchedulerSettings()
    library: LibrarySettings = LibrarySettings()
    api: ApiSettings = ApiSettings()
    grpc: GrpcSettings = GrpcSettings()
    tools: ToolsSettings = ToolsSettings()

    @model_validator(mode="before")
    @classmethod
    def _under_var_dir(cls, data: Any) -> Any:
        # The database and the models folder follow var_dir unless set on their own (null in
        # server.yaml, or left out, means "under var_dir").
        if not isinstance(data, dict):
            return data
        var_dir = data.get("var_dir")
        if var_dir is None:
            var_dir = "var"
        if not isinstance(var_dir, str | Path):
            return data  # the field's own validation says what is wrong
        data = dict(data)
        if data.get("models_dir") is None:
            data["models_dir"] = Path(var_dir) / "models"
        if data.get("database_url") is None:
            data["database_url"] = f"sqlite:///{Path(var_dir) / 'db.sqlite3'}"
        return data

    @field_validator("allowed_hosts", "csrf_trusted_origins", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        # MLXWEB_ALLOWED_HOSTS=chat.example.org,10.0.0.5
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_urls(self) -> ServerConfig:
        if not re.match(r"^(sqlite|postgres|postgresql|pgsql)://", self.database_url):
            raise ValueError("database_url must start with sqlite:// or postgres://")
        if self.redis_url is not None and not re.match(r"^rediss?://", self.redis_url):
            raise ValueError("redis_url must start with redis:// or rediss://")
        if self.debug and self.production:
            raise ValueError("debug and production cannot both be on")
        return self


class Config(_Strict):
    """Everything under configs/."""

    server: ServerConfig
    models: dict[str, ModelConfig]


# Environment variable -> dotted key in server.yaml. Values are parsed as YAML scalars, except
# the ones in _VERBATIM_ENV (secrets, names, paths, URLs), which are taken as written. An empty
# value means null (for a key that has a default: the default).
ENV_OVERRIDES: dict[str, str] = {
    "MLXWEB_VAR_DIR": "var_dir",
    "MLXWEB_SECRET_KEY": "secret_key",
    "MLXWEB_DEBUG": "debug",
    "MLXWEB_PRODUCTION": "production",
    "MLXWEB_HSTS_SECONDS": "hsts_seconds",
    "MLXWEB_ALLOWED_HOSTS": "allowed_hosts",
    "MLXWEB_CSRF_TRUSTED_ORIGINS": "csrf_trusted_origins",
    "MLXWEB_LOG_LEVEL": "log_level",
    "MLXWEB_CELERY_BROKER_URL": "celery_broker_url",
    "MLXWEB_INFERENCE_IN_PROCESS": "inference_in_process",
    "MLXWEB_HOST": "host",
    "MLXWEB_PORT": "port",
    "MLXWEB_DATABASE_URL": "database_url",
    "MLXWEB_REDIS_URL": "redis_url",
    "MLXWEB_DEFAULT_MODEL": "default_model",
    "MLXWEB_MODELS_DIR": "models_dir",
    "MLXWEB_ALLOW_SIGNUP": "allow_signup",
    "MLXWEB_MAX_LOADED_MODELS": "max_loaded_models",
    "MLXWEB_MEMORY_BUDGET_BYTES": "memory_budget_bytes",
    "MLXWEB_MEMORY_BUDGET_FRACTION": "memory_budget_fraction",
    "MLXWEB_KEEP_ALIVE": "keep_alive",
    "MLXWEB_CPU_FLOAT32_MAX_BYTES": "cpu_float32_max_bytes",
    "MLXWEB_MAX_CONCURRENT_STREAMS": "limits.max_concurrent_streams",
    "MLXWEB_MAX_PROMPT_TOKENS": "limits.max_prompt_tokens",
    "MLXWEB_MAX_NEW_TOKENS": "limits.max_new_tokens",
    "MLXWEB_WS_MAX_MESSAGE_BYTES": "limits.ws_max_message_bytes",
    "MLXWEB_MAX_QUEUED_REPLIES_PER_USER": "limits.max_queued_replies_per_user",
    "MLXWEB_MAX_QUEUED_REPLIES": "limits.max_queued_replies",
    "MLXWEB_MAX_STREAMING_REPLIES_PER_USER": "limits.max_streaming_replies_per_user",
    "MLXWEB_ANONYMOUS_BODY_BYTES": "limits.anonymous_body_bytes",
    "MLXWEB_BODY_BYTES": "limits.body_bytes",
    "MLXWEB_LOGIN_FAILURE_LIMIT": "login.failure_limit",
    "MLXWEB_LOGIN_LOCKOUT_MINUTES": "login.lockout_minutes",
    "MLXWEB_PROMPT_CACHE_ENTRIES": "prompt_cache.max_entries",
    "MLXWEB_PROMPT_CACHE_BYTES": "prompt_cache.max_bytes",
    "MLXWEB_KV_PERSISTENCE": "kv_persistence.enabled",
    "MLXWEB_KV_PERSISTENCE_DIR": "kv_persistence.dir",
    "MLXWEB_KV_PERSISTENCE_BYTES": "kv_persistence.max_bytes",
    "MLXWEB_IMPORT_DIRS": "library.import_dirs",
    "MLXWEB_MAX_UPLOAD_BYTES": "library.max_upload_bytes",
    "MLXWEB_API_REQUESTS_PER_MINUTE": "api.requests_per_minute",
    "MLXWEB_API_MAX_CONCURRENT_STREAMS": "api.max_concurrent_streams",
    "MLXWEB_API_MAX_CHOICES": "api.max_choices",
    "MLXWEB_API_CORS_ORIGINS": "api.cors_origins",
    "MLXWEB_API_OPEN_ON_LOOPBACK": "api.open_on_loopback",
    "MLXWEB_GRPC_ENABLED": "grpc.enabled",
    "MLXWEB_GRPC_SOCKET": "grpc.socket",
    "MLXWEB_GRPC_TCP_PORT": "grpc.tcp_port",
    # huggingface_hub's own variables, so that the library pulls where the hub client would.
    "HF_ENDPOINT": "hub.endpoint",
    "HF_HUB_CACHE": "hub.cache",
    "HF_HOME": "hub.home",
    "XDG_CACHE_HOME": "hub.xdg_cache_home",
}
_VERBATIM_ENV = {
    "MLXWEB_VAR_DIR",
    "MLXWEB_SECRET_KEY",
    "MLXWEB_ALLOWED_HOSTS",
    "MLXWEB_CSRF_TRUSTED_ORIGINS",
    "MLXWEB_LOG_LEVEL",
    "MLXWEB_CELERY_BROKER_URL",
    "MLXWEB_HOST",
    "MLXWEB_DATABASE_URL",
    "MLXWEB_REDIS_URL",
    "MLXWEB_DEFAULT_MODEL",
    "MLXWEB_MODELS_DIR",
    "MLXWEB_KV_PERSISTENCE_DIR",
    "MLXWEB_IMPORT_DIRS",
    "MLXWEB_API_CORS_ORIGINS",
    "MLXWEB_GRPC_SOCKET",
    "HF_ENDPOINT",
    "HF_HUB_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except RecursionError as e:
        # PyYAML composes nested collections recursively.
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _describe(
    path: Path | str, error: ValidationError, env_keys: dict[str, str] | None = None
) -> str:
    env_keys = env_keys or {}
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        var = next((v for k, v in env_keys.items() if key == k or key.startswith(f"{k}.")), None)
        origin = f" (from {var})" if var else ""
        lines.append(f"{path}: {key}: {item['msg']}{origin}")
    return "\n".join(lines)


def _env_value(var: str, raw: str) -> Any:
    # A number or a boolean is short; anything longer is not worth handing to the YAML parser.
    if var in _VERBATIM_ENV or len(raw) > 64:
        return raw
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        return raw  # not a YAML scalar: let the schema say what it should have been
    return raw if isinstance(value, str) else value


def _apply_env(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """`data` with the environment's overrides, and which dotted keys came from which variable."""
    applied: dict[str, str] = {}
    for var, dotted in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        raw = environ[var]
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{part}: must be a mapping to take {var}")
            node = child
        if raw == "":
            # Empty means unset: the key falls back to its default, whatever the file says.
            node.pop(leaf, None)
        else:
            node[leaf] = _env_value(var, raw)
            applied[dotted] = var
    return data, applied


def load_config(config_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate configs/; raise ConfigError naming the file, key and reason."""
    environ = os.environ if environ is None else environ
    config_dir = Path(environ.get("MLXWEB_CONFIG_DIR") or config_dir or DEFAULT_CONFIG_DIR)
    server_path = config_dir / "server.yaml"
    data = _read_yaml(server_path) if server_path.exists() else {}
    try:
        data, applied = _apply_env(data, environ)
    except ConfigError as e:
        raise ConfigError(f"{server_path}: {e}") from e
    try:
        server = ServerConfig.model_validate(data)
    except ValidationError as e:
        where = f"{server_path} (or its MLXWEB_* overrides)"
        raise ConfigError(_describe(where, e, applied)) from e

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
