"""Where the data lives: one data folder (`var_dir`) holding everything the server writes.

The database, the models folder, converted models, the job queue, request spool files, collected
static files and the secret key are all under `var_dir` unless set on their own, so a second
instance with another `MLXWEB_VAR_DIR` shares nothing with the first. Settings only read these
paths; `prepare()` (run by the launcher, before Django starts) creates them.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from mlxweb.config import BASE_DIR, ConfigError, ServerConfig

SECRET_KEY_FILE = "secret_key"


@dataclass(frozen=True)
class DataPaths:
    """The folders and files under the data folder, resolved against the project root."""

    var_dir: Path
    models_dir: Path
    database_url: str

    @classmethod
    def from_config(cls, server: ServerConfig, base_dir: Path = BASE_DIR) -> DataPaths:
        var_dir = _resolve(server.var_dir, base_dir)
        # The config puts both under var_dir unless they are set on their own.
        models_dir = _resolve(server.models_dir, base_dir)
        database_url = server.database_url
        if database_url.startswith("sqlite:///") and not database_url.startswith("sqlite:////"):
            # Relative SQLite paths are relative to the project root, not the working directory.
            relative = Path(database_url.removeprefix("sqlite:///"))
            database_url = f"sqlite:///{_resolve(relative, base_dir)}"
        return cls(var_dir=var_dir, models_dir=models_dir, database_url=database_url)

    def resolve(self, path: Path) -> Path:
        return _resolve(path, BASE_DIR)

    @property
    def converted_dir(self) -> Path:
        return self.var_dir / "converted"

    @property
    def celery_dir(self) -> Path:
        return self.var_dir / "celery"

    @property
    def spool_dir(self) -> Path:
        """Request bodies too big for memory, while Django reads them."""
        return self.var_dir / "tmp"

    @property
    def static_root(self) -> Path:
        return self.var_dir / "staticfiles"

    @property
    def secret_key_file(self) -> Path:
        return self.var_dir / SECRET_KEY_FILE

    @property
    def sqlite_path(self) -> Path | None:
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite://"))
        return None

    def secret_key(self, server: ServerConfig) -> str:
        """The configured key, else the one the launcher wrote into the data folder.

        Without either (settings imported outside manage.py, as the test runner does), a
        throw-away key for this process only; production mode refuses to start instead, since
        sessions would not survive a restart or reach a second process.
        """
        if server.secret_key is not None:
            return server.secret_key.get_secret_value()
        try:
            key = self.secret_key_file.read_text().strip()
        except FileNotFoundError:
            key = ""
        if key:
            return key
        if server.production:
            raise ConfigError(
                f"no secret key: set MLXWEB_SECRET_KEY or start through manage.py, which writes "
                f"{self.secret_key_file}"
            )
        return secrets.token_urlsafe(50)

    def prepare(self, server: ServerConfig) -> None:
        """Create the data folders and, unless one is configured, the secret key file."""
        for folder in (
            self.var_dir,
            self.models_dir,
            self.spool_dir,
            self.static_root,  # whitenoise warns when it is missing
            *(self.celery_dir / sub for sub in ("queue", "processed", "control")),
        ):
            folder.mkdir(parents=True, exist_ok=True)
        if (sqlite := self.sqlite_path) is not None:
            sqlite.parent.mkdir(parents=True, exist_ok=True)
        if server.secret_key is None and not self.secret_key_file.exists():
            # A local app has no one to hand a secret to: make one on first start and keep it.
            # Written atomically and 0600, so the web process and the job worker read one key.
            tmp = self.secret_key_file.with_name(f".{SECRET_KEY_FILE}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50))
            try:
                os.link(tmp, self.secret_key_file)  # fails if another process won the race
            except FileExistsError:
                pass
            finally:
                tmp.unlink()


def _resolve(path: Path, base_dir: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base_dir / path


def prepare_data_folder(server: ServerConfig) -> None:
    """The launcher's step: make the data folder ready, or exit with a message."""
    try:
        DataPaths.from_config(server).prepare(server)
    except OSError as e:
        print(f"mlxweb: cannot prepare the data folder: {e}", file=sys.stderr)
        sys.exit(2)
