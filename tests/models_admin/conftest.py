"""Model library fixtures: a tiny Hugging Face-format llama, a local stand-in for the hub, and
folders for the models and the Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from mlxweb.config import BASE_DIR
from models_admin import tasks

TINY_REPO = "test-org/tiny-llama"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "The capital of France is Paris.",
    "A tiny model writes tiny words, one token at a time.",
    "Hello! How are you today? I am fine, thank you.",
    "MLX runs language models on Apple silicon and on Linux CPUs.",
]


def tiny_hf_model_files(*, seed: int = 0) -> dict[str, bytes]:
    """A small llama in Hugging Face format: config, float16 safetensors, a BPE tokenizer."""
    import numpy as np
    from safetensors.numpy import save
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    vocab = tokenizer.get_vocab_size()

    hidden, inter, layers, heads, kv_heads = 128, 256, 2, 4, 2
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": tokenizer.token_to_id("<s>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
    }
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    tensors = {
        "model.embed_tokens.weight": weight(vocab, hidden),
        "model.norm.weight": np.ones(hidden, dtype=np.float16),
        "lm_head.weight": weight(vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.update(
            {
                f"{p}.self_attn.q_proj.weight": weight(heads * head_dim, hidden),
                f"{p}.self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
                f"{p}.self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
                f"{p}.self_attn.o_proj.weight": weight(hidden, heads * head_dim),
                f"{p}.mlp.gate_proj.weight": weight(inter, hidden),
                f"{p}.mlp.up_proj.weight": weight(inter, hidden),
                f"{p}.mlp.down_proj.weight": weight(hidden, inter),
                f"{p}.input_layernorm.weight": np.ones(hidden, dtype=np.float16),
                f"{p}.post_attention_layernorm.weight": np.ones(hidden, dtype=np.float16),
            }
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "model.safetensors": save(tensors, metadata={"format": "pt"}),
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode(),
        "generation_config.json": json.dumps({"eos_token_id": config["eos_token_id"]}).encode(),
    }


# What a real repo also holds, and a pull must never fetch: pickles, code, the model card.
REPO_EXTRAS = {
    "pytorch_model.bin": b"\x80\x04pickled weights must never be downloaded",
    "modeling_tiny.py": b"raise SystemExit('remote code must never be downloaded')\n",
    "README.md": b"# tiny llama\n",
}


@pytest.fixture(scope="session")
def tiny_files() -> dict[str, bytes]:
    return tiny_hf_model_files()


@pytest.fixture
def tiny_hf_dir(models_root: Path, tiny_files: dict[str, bytes]) -> Path:
    """The tiny llama, Hugging Face format, as a folder in the models folder."""
    path = models_root / "tiny-hf"
    path.mkdir()
    for name, data in tiny_files.items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture
def hf_cache(tmp_path: Path, settings: Any) -> Path:
    """An empty Hugging Face cache that the library pulls into and scans."""
    path = tmp_path / "hf-cache"
    settings.MLXWEB_HF_CACHE = path
    return path


@pytest.fixture
def library(models_root: Path, hf_cache: Path) -> Path:
    """Both folders the library may touch, empty; the models folder is returned."""
    return models_root


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Jobs handed to Celery, recorded instead of published (unit tests have no broker)."""
    calls: list[dict[str, Any]] = []

    def record(args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append({"args": list(args or []), **options})

    monkeypatch.setattr(tasks.run_model_job, "apply_async", record)
    return calls


def retrying(operation: Any, attempts: int = 100) -> Any:
    """Run a database operation from a helper thread, retrying while SQLite's shared in-memory
    test database answers "table is locked" (it does not wait like a file database does)."""
    from django.db import OperationalError

    for _ in range(attempts - 1):
        try:
            return operation()
        except OperationalError:
            time.sleep(0.02)
    return operation()


@pytest.fixture
def running_job(library: Path) -> Any:
    """A pull job three quarters through its download, as its worker last reported."""
    from django.utils import timezone

    from models_admin import services
    from models_admin.models import ModelJob

    job = services.job_create(kind="pull", params={"repo_id": "org/model"})
    ModelJob.objects.filter(pk=job.pk).update(
        state=ModelJob.State.RUNNING,
        step="downloading 4 files",
        done=3 * 1024 * 1024,
        total=4 * 1024 * 1024,
        unit="bytes",
        speed=1024 * 1024,
        eta_seconds=1.0,
        log="looking up org/model@main\ndownloading 4 files",
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
    )
    job.refresh_from_db()
    return job


@pytest.fixture
def fast_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress written to the job row ten times a second instead of once."""
    from models_admin import progress

    monkeypatch.setattr(progress, "FLUSH_INTERVAL_SECONDS", 0.1)


# ---------------------------------------------------------------------------------------------
# A stand-in for the Hugging Face hub


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    gated: bool = False

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def git_oid(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    """The part of the hub's HTTP API that huggingface_hub 2.4's snapshot_download uses.

    Serves repo info, the recursive tree listing and `resolve` (HEAD and GET with Range), with
    the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length, X-Error-Code).
    `drop_after[file] = n` closes the connection once after sending n bytes of that file;
    `down_after_drop` then also puts that file in `unavailable`, whose files answer HTTP 503
    until taken out (an outage longer than a client's retries); `bytes_per_second` slows every
    file transfer down.
    """

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    down_after_drop: bool = False
    unavailable: set[str] = field(default_factory=set)
    bytes_per_second: float | None = None
    served: dict[str, int] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> FakeRepo:
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(files[k] for k in sorted(files))
        ).hexdigest()
        repo = FakeRepo(repo_id=repo_id, files=dict(files), commit=commit, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def file_requests(self, name: str, method: str = "GET") -> list[dict[str, Any]]:
        return [
            r for r in self.requests if r["method"] == method and r["path"].endswith(f"/{name}")
        ]

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- request handling ----------------------------------------------------------------------

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(
        self, h: BaseHTTPRequestHandler, status: int, code: str, head: bool, **extra: str
    ) -> None:
        body = json.dumps({"error": code}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": code, **extra}
        headers["Content-Type"] = "application/json"
        self._send(h, status, body, headers, head=head)

    def _json(self, h: BaseHTTPRequestHandler, data: Any, head: bool) -> None:
        body = json.dumps(data).encode()
        self._send(h, 200, body, {"Content-Type": "application/json"}, head=head)

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append(
                {"method": h.command, "path": path, "range": h.headers.get("Range")}
            )
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self.repos.get(f"{parts[2]}/{parts[3]}")
            rest = parts[4:]
            if repo is None:
                return self._error(h, 404, "RepoNotFound", head)
            if repo.gated:
                return self._error(h, 401, "GatedRepo", head)
            if rest and rest[0] in {"revision", "tree"}:
                revision = "/".join(rest[1:])
                if revision not in {"main", repo.commit}:
                    return self._error(h, 404, "RevisionNotFound", head)
            if rest[:1] == ["tree"]:
                return self._json(h, self._tree(repo), head)
            return self._json(h, self._info(repo), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repos.get(f"{parts[0]}/{parts[1]}")
            if repo is None:
                return self._error(h, 404, "RepoNotFound", head)
            if repo.gated:
                return self._error(h, 401, "GatedRepo", head)
            revision, name = parts[3], "/".join(parts[4:])
            if revision not in {"main", repo.commit}:
                return self._error(h, 404, "RevisionNotFound", head)
            if name not in repo.files:
                return self._error(h, 404, "EntryNotFound", head, **{"X-Repo-Commit": repo.commit})
            if name in self.unavailable and not head:
                return self._error(h, 503, "ServiceUnavailable", head)
            return self._file(h, repo, name, head)
        return self._error(h, 404, "RepoNotFound", head)

    def _info(self, repo: FakeRepo) -> dict[str, Any]:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": False,
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        }

    def _tree(self, repo: FakeRepo) -> list[dict[str, Any]]:
        entries = []
        for name in sorted(repo.files):
            entry: dict[str, Any] = {
                "type": "file",
                "path": name,
                "size": len(repo.files[name]),
                "oid": repo.git_oid(name),
            }
            if name.endswith((".safetensors", ".bin")):
                entry["lfs"] = {
                    "oid": repo.sha256(name),
                    "size": len(repo.files[name]),
                    "pointerSize": 134,
                }
            entries.append(entry)
        return entries

    def _file(self, h: BaseHTTPRequestHandler, repo: FakeRepo, name: str, head: bool) -> None:
        data = repo.files[name]
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": f'"{repo.sha256(name)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if head:
            h.send_response(200)
            for key, value in headers.items():
                h.send_header(key, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            return
        start = 0
        status = 200
        requested = h.headers.get("Range")
        if requested and requested.startswith("bytes="):
            start = int(requested.removeprefix("bytes=").split("-")[0] or 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        drop = self.drop_after.pop(name, None) if status == 200 else None
        sent = 0
        chunk = 16 * 1024
        limit = len(body) if drop is None else drop
        while sent < limit:
            piece = body[sent : min(sent + chunk, limit)]
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:
                return
            sent += len(piece)
            with self.lock:
                self.served[name] = self.served.get(name, 0) + len(piece)
            if self.bytes_per_second:
                time.sleep(len(piece) / self.bytes_per_second)
        if drop is not None:
            # The transfer breaks half-way, as on a flaky network.
            if self.down_after_drop:
                self.unavailable.add(name)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def fake_hub(settings: Any, tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    """A local hub serving the tiny llama as `test-org/tiny-llama`, with huggingface_hub
    pointed at it."""
    hub = FakeHub()
    hub.add_repo(TINY_REPO, {**tiny_files, **REPO_EXTRAS})
    hub.start()
    settings.MLXWEB_HF_ENDPOINT = hub.url
    yield hub
    hub.stop()


def closed_port_url() -> str:
    """The URL of a local port nothing listens on: "no network" for the hub client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------
# Other processes (a real Celery worker), sharing a file database with the test


@dataclass
class Deployment:
    """Environment for manage.py and Celery processes: their own SQLite file, var folder,
    models folder and Hugging Face cache, all under a temporary folder."""

    root: Path
    env: dict[str, str]

    @property
    def db_path(self) -> Path:
        return self.root / "db.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=BASE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def job(self, code: str) -> dict[str, Any] | None:
        with sqlite3.connect(self.db_path) as db:
            db.row_factory = sqlite3.Row
            row = db.execute(
                "SELECT * FROM models_admin_modeljob WHERE code = ?", [code.replace("-", "")]
            ).fetchone()
        return dict(row) if row is not None else None

    def wait_for_job(self, code: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.job(code)
            if row is not None and row["state"] in {"succeeded", "failed", "cancelled"}:
                return row
            time.sleep(0.5)
        raise AssertionError(f"job {code} did not finish in {timeout} s: {self.job(code)}")


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    root = tmp_path / "deployment"
    (root / "models").mkdir(parents=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_MODELS_DIR": str(root / "models"),
        "HF_HUB_CACHE": str(root / "hf-cache"),
        "MLXWEB_LOG_LEVEL": "INFO",
    }
    env.pop("MLXWEB_REDIS_URL", None)
    deployment = Deployment(root=root, env=env)
    deployment.manage("migrate", "--noinput")
    return deployment


def stop_process(process: subprocess.Popen[Any]) -> str:
    """Stop a child process and return what it wrote."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ""


def finished_validation(path: str, **result: Any) -> Any:
    """A Validate job of the model at `path` that succeeded, with a report as it would store."""
    from django.utils import timezone

    from models_admin import services
    from models_admin.models import ModelJob

    report = {
        "candidate": Path(path).name,
        "reference": "model.Q4_K_M.gguf (dequantized)",
        "n_tokens": 32,
        "prompts": [
            {
                "prompt": "What is the capital of France? Answer briefly.",
                "candidate_text": "The capital of France is Paris.",
                "reference_text": "The capital of France is Paris.",
                "candidate_tokens": [1, 2],
                "reference_tokens": [1, 2],
                "prefix_tokens": 32,
                "matching_tokens": 31,
            }
        ],
        "prefix_agreement": 0.95,
        "token_agreement": 0.96875,
        "identical_answers": 1,
        "perplexity": 12.5,
        "reference_perplexity": 12.25,
        "perplexity_ratio": 12.5 / 12.25,
        "text_tokens": 200,
        "same_tokenization": True,
        "size_bytes": 80_000_000,
        "reference_size_bytes": 98_000_000,
        "memory_bytes": 80_000_000,
        "reference_memory_bytes": 540_000_000,
        "decode_tok_s": 42.5,
        "reference_decode_tok_s": 20.25,
        "seconds": 12.0,
        "notes": [],
        "summary": "token agreement 97% ...",
        "path": path,
        "reference_kind": "gguf",
        "reference_path": "/models/model.Q4_K_M.gguf",
        **result,
    }
    job = services.job_create(kind="validate", params={"source": path}, enqueue=False)
    ModelJob.objects.filter(pk=job.pk).update(
        state=ModelJob.State.SUCCEEDED, result=report, finished_at=timezone.now()
    )
    job.refresh_from_db()
    return job
