"""Django settings for mlxweb.

One file, driven by configs/server.yaml and MLXWEB_* environment variables. Defaults run on SQLite,
the in-memory channel layer and an in-process inference worker; a Redis URL switches on
channels-redis, a separate inference worker process and the Redis Celery broker.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dj_database_url
from django.utils.csp import CSP

from mlxweb.config import BASE_DIR, load_config
from mlxweb.paths import DataPaths

# Every environment variable is read by load_config (mlxweb.config.ENV_OVERRIDES), and importing
# this module writes nothing: the launcher (manage.py) makes the folders and the secret key.
MLXWEB_CONFIG = load_config()
SERVER = MLXWEB_CONFIG.server
PATHS = DataPaths.from_config(SERVER)
VAR_DIR = PATHS.var_dir
MLXWEB_MODELS_DIR = PATHS.models_dir
# Converted forms of GGUF models, so that later starts skip the conversion.
MLXWEB_CONVERTED_DIR = PATHS.converted_dir
# Folders GGUF files may be imported from besides the models folder and the Hugging Face cache,
# and the largest GGUF the Models page accepts as an upload.
MLXWEB_IMPORT_DIRS = [PATHS.resolve(path) for path in SERVER.library.import_dirs]
MLXWEB_MAX_UPLOAD_BYTES = SERVER.library.max_upload_bytes
# Request bodies beyond Django's in-memory size spool here, not in the system's /tmp.
FILE_UPLOAD_TEMP_DIR = str(PATHS.spool_dir)

SECRET_KEY = PATHS.secret_key(SERVER)
DEBUG = SERVER.debug
ALLOWED_HOSTS = list(SERVER.allowed_hosts) or ["127.0.0.1", "localhost", "[::1]", SERVER.host]
CSRF_TRUSTED_ORIGINS = list(SERVER.csrf_trusted_origins)

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
    # Sign-in throttling: failed attempts per account and per address, a lockout that expires.
    "axes",
    # django-ninja: the OpenAI/Ollama APIs' schemas and OpenAPI; here for its Swagger UI files.
    "ninja",
    "inference",
    # The OpenAI- and Ollama-compatible APIs, API keys, /health and /metrics.
    "inference.api",
    "chat",
    "models_admin",
    # Project-level management commands (serve).
    "mlxweb",
]

MIDDLEWARE = [
    # Outermost, so that it counts every answer (mlxweb_http_requests_total).
    "inference.api.metrics.HttpMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # CORS for /v1 and /api only, origins from configs (api.cors_origins).
    "inference.api.cors.ApiCorsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into the lockout response.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
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
    db: dict[str, Any] = dict(dj_database_url.parse(PATHS.database_url, conn_max_age=0))
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
STATIC_ROOT = PATHS.static_root
WHITENOISE_USE_FINDERS = True

# Channels: in-memory (one process) unless a Redis URL is configured.
REDIS_URL = SERVER.redis_url
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default, the length of
            # channels_redis' blocking BZPOPMIN: a consumer that heard nothing for 5 s could
            # time out on its read and die (redis/redis-py#4091). Reads may take the blocking
            # call's 5 s and then some; a Redis that stops answering still fails them.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
                "capacity": 1000,
                "expiry": 60,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# The inference worker runs inside the web process unless it can be reached over Redis.
INFERENCE_CHANNEL = "inference"
INFERENCE_IN_PROCESS = (
    SERVER.inference_in_process if SERVER.inference_in_process is not None else not REDIS_URL
)

# Closed by default: the first account (the admin) signs up, later ones are created by the admin.
MLXWEB_ALLOW_SIGNUP = SERVER.allow_signup

# Model library jobs (pull, convert, quantize, delete...) run on Celery. Without a Redis URL the
# broker is kombu's filesystem transport under VAR_DIR and `manage.py serve` starts one worker as
# its child (see mlxweb/celery.py for why that transport); with one, Redis is the broker and the
# worker is a separate `celery -A mlxweb worker` process. The job row is the record: no results.
CELERY_BROKER_URL = SERVER.celery_broker_url or REDIS_URL or "filesystem://localhost/"
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = PATHS.celery_dir
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
# The Hugging Face hub and cache the library pulls into. huggingface_hub reads its variables
# once at import; taking them through the config lets tests and `manage.py` point them elsewhere.
MLXWEB_HF_ENDPOINT = SERVER.hub.endpoint_url
MLXWEB_HF_CACHE = SERVER.hub.cache_dir

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": SERVER.log_level},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # huggingface_hub's HTTP client logs every request at INFO.
        "httpx2": {"level": "WARNING"},
    },
}

# Login throttling (django-axes): `failure_limit` wrong passwords for one account, or from one
# address, lock that account or address out for `lockout_minutes`; the lockout then expires.
AXES_FAILURE_LIMIT = SERVER.login.failure_limit
AXES_COOLOFF_TIME = timedelta(minutes=SERVER.login.lockout_minutes)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "mlxweb.security.client_ip"
AXES_VERBOSE = False

# Content-Security-Policy: only this origin's scripts, styles and images (no inline script or
# style, no eval), so a reply's markdown image or an injected tag cannot load anything remote.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "font-src": [CSP.SELF],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Production mode: behind a reverse proxy that terminates TLS and sets X-Forwarded-Proto (see
# README, "Production"). Everything `manage.py check --deploy` asks for.
MLXWEB_PRODUCTION = SERVER.production
if MLXWEB_PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = SERVER.hsts_seconds
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    # Preloading asks browsers to hard-code HTTPS for the whole domain, a one-way commitment
    # that belongs to whoever owns the domain, not to this app's defaults.
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
