"""Django settings for mlxweb.

One file, driven by configs/server.yaml and MLXWEB_* environment variables. Defaults run on SQLite,
the in-memory channel layer and an in-process inference worker; a Redis URL switches on
channels-redis, a separate inference worker process and the Redis Celery broker.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dj_database_url

from mlxweb.config import BASE_DIR, ConfigError, load_config


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() else BASE_DIR / path


MLXWEB_CONFIG = load_config()
SERVER = MLXWEB_CONFIG.server
VAR_DIR = _resolve(Path(os.environ.get("MLXWEB_VAR_DIR", "var")))
MLXWEB_MODELS_DIR = _resolve(SERVER.models_dir)
# Converted forms of GGUF models, so that later starts skip the conversion.
MLXWEB_CONVERTED_DIR = VAR_DIR / "converted"
# Folders GGUF files may be imported from besides the models folder and the Hugging Face cache,
# and the largest GGUF the Models page accepts as an upload.
MLXWEB_IMPORT_DIRS = [_resolve(path) for path in SERVER.library.import_dirs]
MLXWEB_MAX_UPLOAD_BYTES = SERVER.library.max_upload_bytes


def _secret_key() -> str:
    if key := os.environ.get("MLXWEB_SECRET_KEY"):
        return key
    # A local app has no one to hand a secret to: make one on first start and keep it.
    path = VAR_DIR / "secret_key"
    if path.exists():
        return path.read_text().strip()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    path.write_text(key)
    path.chmod(0o600)
    return key


SECRET_KEY = _secret_key()
DEBUG = _env_bool("MLXWEB_DEBUG", False)
ALLOWED_HOSTS = _env_list("MLXWEB_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", SERVER.host])
CSRF_TRUSTED_ORIGINS = _env_list("MLXWEB_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "inference",
    "chat",
    "models_admin",
    # Project-level management commands (serve).
    "mlxweb",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "mlxweb.urls"
ASGI_APPLICATION = "mlxweb.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, Any]:
    url = SERVER.database_url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        # Relative SQLite paths are relative to the project root, not the working directory.
        path = _resolve(Path(url.removeprefix("sqlite:///")))
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    db: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=0))
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # The in-process worker writes while requests read: WAL and a busy timeout keep
        # SQLite from answering "database is locked".
        db["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return db


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns when it is missing
WHITENOISE_USE_FINDERS = True

# Channels: in-memory (one process) unless a Redis URL is configured.
REDIS_URL = SERVER.redis_url
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 1000, "expiry": 60},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# The inference worker runs inside the web process unless it can be reached over Redis.
INFERENCE_CHANNEL = "inference"
INFERENCE_IN_PROCESS = _env_bool("MLXWEB_INFERENCE_IN_PROCESS", not REDIS_URL)

MLXWEB_ALLOW_SIGNUP = SERVER.allow_signup

# Model library jobs (pull, convert, quantize, delete...) run on Celery. Without a Redis URL the
# broker is kombu's filesystem transport under VAR_DIR and `manage.py serve` starts one worker as
# its child (see mlxweb/celery.py for why that transport); with one, Redis is the broker and the
# worker is a separate `celery -A mlxweb worker` process. The job row is the record: no results.
CELERY_BROKER_URL = (
    os.environ.get("MLXWEB_CELERY_BROKER_URL") or REDIS_URL or "filesystem://localhost/"
)
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = VAR_DIR / "celery"
    for _sub in ("queue", "processed", "control"):
        (_queue_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # The web process writes messages and the worker reads them, in one shared folder.
        "data_folder_in": str(_queue_dir / "queue"),
        "data_folder_out": str(_queue_dir / "queue"),
        "processed_folder": str(_queue_dir / "processed"),
        "control_folder": str(_queue_dir / "control"),
    }
    # Remote control needs a fanout exchange; dead workers' pidbox queues would pile up as files.
    CELERY_WORKER_ENABLE_REMOTE_CONTROL = False
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "models.light"
# One job at a time unless a worker is started with more (`-c 4` for the light queue, say).
CELERY_WORKER_CONCURRENCY = 1
# Memory-heavy jobs (convert, quantize) go to their own queue, served one at a time.
MODELS_QUEUE_HEAVY = "models.heavy"
MODELS_QUEUE_LIGHT = "models.light"
# The Hugging Face hub and cache the library pulls into. huggingface_hub reads these variables
# once at import; reading them here lets tests and `manage.py` point them elsewhere per call.
MLXWEB_HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
MLXWEB_HF_CACHE = Path(
    os.environ.get("HF_HUB_CACHE")
    or Path(
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    / "hub"
).expanduser()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": os.environ.get("MLXWEB_LOG_LEVEL", "INFO")},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # huggingface_hub's HTTP client logs every request at INFO.
        "httpx2": {"level": "WARNING"},
    },
}
