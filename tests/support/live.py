"""Running the real server in subprocesses, for the scale-out and browser tests."""

from __future__ import annotations

import http.cookiejar
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on {port} within {timeout} s")


def write_configs(directory: Path, *, model_id: str, model_dir: str, **server: object) -> Path:
    """A configs folder whose default model is an MLX directory inside the models dir."""
    (directory / "models").mkdir(parents=True, exist_ok=True)
    lines = [f"default_model: {model_id}"] + [f"{k}: {v}" for k, v in server.items()]
    (directory / "server.yaml").write_text("\n".join(lines) + "\n")
    (directory / "models" / f"{model_id}.yaml").write_text(
        f"name: {model_id}\nsource:\n  path: {model_dir}\ncontext_length: 2048\n"
        "sampling:\n  temperature: 0\n  max_tokens: 64\n"
    )
    return directory


def api_site(
    root: Path,
    *,
    tiny_model_dir: Path,
    embed_model: str,
    embed_dir: Path,
    users: dict[str, bool],
    password: str,
    env: dict[str, str],
) -> Site:
    """A migrated site under `root` serving the tiny model ("tiny") and an embedding model,
    with `users` (name: is superuser) made; not started. `env` adds MLXWEB_* settings."""
    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    (models / embed_model).symlink_to(embed_dir, target_is_directory=True)
    configs = write_configs(root / "configs", model_id="tiny", model_dir="tiny")
    (configs / "models" / f"{embed_model}.yaml").write_text(
        f"name: {embed_model}\ntask: embed\nsource:\n  path: {embed_model}\n"
        "context_length: 256\n"
    )
    site = Site(
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
            "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
            "MLXWEB_CONFIG_DIR": str(configs),
            "MLXWEB_MODELS_DIR": str(models),
            "MLXWEB_VAR_DIR": str(root / "var"),
            "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
            "PYTHONUNBUFFERED": "1",
            **env,
        },
        log_dir=root,
    )
    site.manage("migrate", "--noinput", "-v0")
    made = "; ".join(
        f"User.objects.{'create_superuser' if admin else 'create_user'}({name!r}, "
        f"password={password!r})"
        for name, admin in users.items()
    )
    site.manage("shell", "-c", f"from django.contrib.auth.models import User; {made}")
    return site


@dataclass(eq=False)
class Site:
    """An mlxweb started with `manage.py` subprocesses in a given environment."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    port: int = 0

    def manage(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        if self not in RUNNING:
            RUNNING.append(self)
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.processes[name] = process
        return process

    def serve(self, *extra: str) -> None:
        self.port = free_port()
        process = self.start("web", "serve", "--port", str(self.port), *extra)
        wait_for_port(self.port, process)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name, signal.SIGKILL)
        if self in RUNNING:
            RUNNING.remove(self)

    def dump_threads(self, timeout: float = 3.0) -> None:
        """Have each running `serve` process write its threads' stacks to its log, and wait
        (up to `timeout`) until the log stops growing."""
        for name, process in self.processes.items():
            serving = isinstance(process.args, list) and "serve" in process.args
            if process.poll() is not None or not serving:
                continue
            path = self.log_dir / f"{name}.log"
            before = path.stat().st_size if path.exists() else 0
            os.kill(process.pid, signal.SIGUSR1)
            deadline = time.monotonic() + timeout
            size = before
            while time.monotonic() < deadline:
                time.sleep(0.1)
                now = path.stat().st_size if path.exists() else 0
                if now > before and now == size:
                    break
                size = now

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# The sites started and not yet stopped (a failed test reports their logs: tests/conftest.py).
RUNNING: list[Site] = []


class Browserless:
    """A cookie-keeping HTTP client that signs in like a browser's form post."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[str, str]:
        with self.opener.open(self.base_url + path, timeout=30) as response:
            return response.geturl(), response.read().decode()

    def post(
        self, path: str, data: dict[str, str], form_page: str | None = None
    ) -> tuple[str, str]:
        """Post a form as a browser would: the CSRF token comes from the page showing it."""
        _, page = self.get(form_page or path)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token, f"no CSRF token on {path}"
        body = urllib.parse.urlencode({**data, "csrfmiddlewaretoken": token.group(1)}).encode()
        request = urllib.request.Request(
            self.base_url + path, data=body, headers={"Referer": self.base_url + path}
        )
        with self.opener.open(request, timeout=30) as response:
            return response.geturl(), response.read().decode()

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)
