"""`python`: run a cell of Python in a sandbox (issue 11).

The code runs in Debian's system `python3` (/usr/bin/python3), outside the app's virtualenv, so
none of the app's packages, settings or keys are importable; what Debian has installed (numpy,
matplotlib, ...) is. It runs under bubblewrap, never unsandboxed:

- its own user, pid, network, IPC and UTS namespaces: no network at all (not even the host's
  loopback), no view of the host's processes;
- a fresh mount view: /usr (and the few /etc files the loader and fonts need) read-only, a private
  /tmp, the conversation's workspace at /workspace as the only writable and visible project
  folder; the repository, the data folder (database, secret key, models) and /root are not there;
- a cleared environment (PATH, HOME, LANG and a few library knobs only);
- limits set before the code runs: CPU time, address space, processes, file size, no core
  files; a wall-clock timeout that kills the whole sandbox; `--die-with-parent`, a new session,
  and bubblewrap's no-new-privileges. When the app runs as root the sandbox runs as `nobody`:
  root is exempt from the process limit, and must not own the code that runs.

Like a notebook cell, every statement runs and the value of a last expression comes back as its
repr. Files created or changed in the workspace are listed; images come back as `ToolFile`s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from inference.tools.base import MAX_RESULT_CHARS, Tool, ToolContext, ToolFile, ToolResult

__all__ = ["SYSTEM_PYTHON", "PythonSettings", "PythonTool", "tools"]

logger = logging.getLogger(__name__)

# Debian's interpreter, not the venv's: the app's packages and settings stay out of reach.
SYSTEM_PYTHON = "/usr/bin/python3"
# Who the sandbox runs as when the app is root (root ignores RLIMIT_NPROC).
SANDBOX_UID = 65534
SANDBOX_GID = 65534
MAX_CODE_CHARS = 100_000
# Files listed back (and images returned) per call, and how large an image may be.
MAX_CHANGED_FILES = 50
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Walking a workspace larger than this to find changes is not worth it: changes go unreported.
MAX_WORKSPACE_ENTRIES = 20_000

# The runner's exit codes for limits it recognises (anything else is the code's own status
# or, above 128, the signal that killed it).
_EXIT_SYNTAX, _EXIT_MEMORY, _EXIT_PROCESSES, _EXIT_FILE_SIZE, _EXIT_NETWORK = 2, 3, 4, 5, 6

# Runs inside the sandbox before the user's code: the limits, then the cell. Read from stdin,
# so the code never shows in a process listing or a file the sandbox could race.
_RUNNER = r"""
import ast, errno, json, os, resource, signal, sys, traceback
limits = json.loads(sys.argv[1])
MB = 1024 * 1024
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * MB,) * 2)
resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] * MB,) * 2)
# A write past the file-size limit raises (EFBIG) instead of killing the process silently.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
code = sys.stdin.read()
sys.stdin = open(os.devnull)
result = os.fdopen(limits["result_fd"], "w", encoding="utf-8", errors="replace")
main_pid = os.getpid()

def report(exc, status):
    sys.stdout.flush()
    tb = exc.__traceback__
    traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)
    sys.stderr.flush()
    os._exit(status) if os.getpid() != main_pid else sys.exit(status)

try:
    tree = ast.parse(code, "<cell>", "exec")
except (SyntaxError, ValueError) as exc:
    traceback.print_exception(type(exc), exc, None)
    sys.exit(2)
last = None
if tree.body and isinstance(tree.body[-1], ast.Expr):
    last = ast.Expression(tree.body.pop().value)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(tree, "<cell>", "exec"), namespace)
    if last is not None:
        value = eval(compile(last, "<cell>", "eval"), namespace)
        if value is not None:
            result.write(repr(value))
            result.flush()
except SystemExit as exc:
    if exc.code not in (None, 0):
        print(f"SystemExit: {exc.code}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
except MemoryError as exc:
    namespace.clear()
    report(exc, 3)
except BlockingIOError as exc:
    report(exc, 4 if exc.errno == errno.EAGAIN else 1)
except OSError as exc:
    offline = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)
    cause = exc.reason if isinstance(getattr(exc, "reason", None), OSError) else exc
    if exc.errno == errno.EFBIG:
        report(exc, 5)
    report(exc, 6 if cause.errno in offline or type(cause).__name__ == "gaierror" else 1)
except BaseException as exc:
    report(exc, 1)
sys.stdout.flush()
if os.getpid() != main_pid:
    os._exit(0)
"""

# /etc files the dynamic loader, fonts (matplotlib) and time zones need; nothing with secrets.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/fonts",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/matplotlibrc",
    "/etc/python3",
    "/etc/python3.11",
)
# Raster images the chat shows, by their first bytes (the extension alone is not trusted).
_IMAGE_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}


class PythonSettings(BaseModel):
    """`tools.python`: the sandbox's limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # CPU seconds the code may use (RLIMIT_CPU).
    cpu_seconds: int = Field(30, ge=1, le=3600)
    # Address space of each process, MiB (RLIMIT_AS).
    memory_mb: int = Field(1024, ge=64, le=65536)
    # Processes and threads in the sandbox, its init and the interpreter included (RLIMIT_NPROC).
    max_processes: int = Field(32, ge=4, le=4096)
    # Largest file the code may write, MiB (RLIMIT_FSIZE); also the size of its private /tmp.
    max_file_mb: int = Field(64, ge=1, le=16384)
    # What the conversation's workspace may hold, MiB. A call that leaves it over this loses
    # the files it created or grew (each file is already bounded by max_file_mb while it runs).
    workspace_mb: int = Field(512, ge=1, le=1_048_576)
    # Wall-clock seconds before the whole sandbox is killed (the call's own timeout may be less).
    timeout_seconds: float = Field(60.0, gt=0, le=3600)
    # Characters of stdout and of stderr kept; the rest is cut.
    max_output_chars: int = Field(8000, ge=100, le=MAX_RESULT_CHARS)


@dataclass
class _Capture:
    """A stream read to its end, its first `limit` bytes kept."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = max(self.limit - len(self.data), 0)
        self.data += chunk[:room]
        self.dropped += max(len(chunk) - room, 0)

    def text(self, max_chars: int) -> str:
        text = self.data.decode("utf-8", errors="replace")
        cut = max(len(text) - max_chars, 0)
        if cut or self.dropped:
            text = text[:max_chars] + "\n… (output cut)"
        return text


def _system_binary(name: str) -> str | None:
    """`name` from the system's own folders (never the caller's PATH)."""
    return shutil.which(name, path="/usr/bin:/bin:/usr/local/bin")


def _bwrap() -> str | None:
    return _system_binary("bwrap")


def _setpriv() -> str | None:
    return _system_binary("setpriv")


def _as_nobody() -> list[str]:
    """What starts the sandbox as nobody when the app runs as root: util-linux's setpriv, not
    Popen's `user=`. With `user=` CPython forks instead of vforking, and fork() runs the
    process's fork handlers: OpenBLAS's stops its thread pool and waits for it, so a fork while
    the engine thread multiplies on the CPU hangs both threads for good (it did in CI: a step
    that never left "Queued", then a reply that never started)."""
    setpriv = _setpriv()
    assert setpriv is not None
    uid, gid = str(SANDBOX_UID), str(SANDBOX_GID)
    return [setpriv, "--reuid", uid, "--regid", gid, "--clear-groups", "--"]


def _walk(
    root: Path, *, limit: int | None = MAX_WORKSPACE_ENTRIES
) -> dict[str, tuple[int, int]] | None:
    """Regular files under root (symlinks not followed): relative path -> (mtime_ns, size);
    None past `limit` entries."""
    found: dict[str, tuple[int, int]] = {}
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
        if limit is not None and count > limit:
            return None
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
    return found


def _reachable_by_others(path: Path) -> bool:
    """Whether every folder above path lets other users through (bubblewrap, started as nobody
    under root, opens the workspace by its path)."""
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in path.resolve().parents)


def _chown_tree(root: Path, uid: int, gid: int, *, strip_setid: bool) -> None:
    """Give root's whole tree to uid:gid, never following a symlink the sandbox left."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                os.lchown(path, uid, gid)
                if strip_setid:
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o6000:
                        os.chmod(path, st.st_mode & 0o1777)
            except OSError:
                continue


def _image_mime(path: Path) -> str | None:
    mime = mimetypes.guess_type(path.name)[0]
    if mime not in _IMAGE_MAGIC:
        return None
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    if not any(head.startswith(magic) for magic in _IMAGE_MAGIC[mime]):
        return None
    if mime == "image/webp" and head[8:12] != b"WEBP":
        return None
    return mime


class PythonTool:
    """The `python` tool: one notebook-like cell in the sandbox, per conversation workspace."""

    name = "python"
    description = (
        "Run Python 3 code in a sandbox (Debian's system python3 with its installed packages; "
        "no network). The working directory is the conversation's workspace, kept between "
        "calls; files written there come back, and images (PNG, JPEG, GIF, WebP) are shown. "
        "Returns stdout, stderr and the value of the last expression, like a notebook cell."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
        "additionalProperties": False,
    }
    mutating = True

    def __init__(self, settings: PythonSettings) -> None:
        self.settings = settings
        self._available = False

    # -- availability ------------------------------------------------------------------------

    def availability(self) -> str | None:
        """None when a sandbox can be made here (checked by making one), else why not."""
        if self._available:
            return None
        if not sys.platform.startswith("linux"):
            return "The Python sandbox needs Linux (bubblewrap and namespaces)."
        if _bwrap() is None:
            return "The Python sandbox needs bubblewrap: install it (apt-get install bubblewrap)."
        if os.geteuid() == 0 and _setpriv() is None:
            return "The Python sandbox needs setpriv (util-linux) to leave root: install it."
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            return f"The Python sandbox runs the system {SYSTEM_PYTHON}, which is not installed."
        with tempfile.TemporaryDirectory(prefix="mlxweb-sandbox-probe-") as empty:
            os.chmod(empty, 0o755)  # the sandbox's user (nobody, under root) must enter it
            probe = self._sandbox(
                "print('ok')", Path(empty), timeout=20.0, cancelled=lambda: False, probe=True
            )
        if probe.status != 0 or probe.stdout.text(100).strip() != "ok":
            why = probe.stderr.text(300).strip() or f"exit status {probe.status}"
            return f"No sandbox can be made here (bubblewrap failed: {why})."
        self._available = True
        return None

    # -- running -----------------------------------------------------------------------------

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        code = arguments.get("code") if isinstance(arguments, dict) else None
        if not isinstance(code, str) or not code.strip():
            return _failure("`code` must be a non-empty string of Python.")
        if set(arguments) - {"code"}:
            return _failure(f"Unknown arguments: {', '.join(sorted(set(arguments) - {'code'}))}.")
        if len(code) > MAX_CODE_CHARS:
            return _failure(f"The code is longer than {MAX_CODE_CHARS} characters.")
        why = self.availability()
        if why is not None:
            return _failure(why)
        if context.cancelled():
            return _failure("stopped")
        workspace = context.workspace
        if not workspace.is_dir():
            return _failure("The conversation's workspace is missing.")
        if os.geteuid() == 0 and not _reachable_by_others(workspace):
            return _failure(
                "The sandbox runs as nobody, which cannot reach the workspace: a folder above it "
                "is closed to other users."
            )
        try:
            before = _walk(workspace)
            run = self._sandbox(
                code,
                workspace,
                timeout=min(self.settings.timeout_seconds, context.timeout),
                cancelled=context.cancelled,
            )
        except OSError as exc:
            logger.exception("python: the sandbox could not start")
            return _failure(f"The sandbox could not start: {exc}")
        after = _walk(workspace) if before is not None else None
        over_quota = self._enforce_quota(workspace, before, after)
        return self._result(run, workspace, before, after, over_quota=over_quota)

    def _enforce_quota(
        self,
        workspace: Path,
        before: dict[str, tuple[int, int]] | None,
        after: dict[str, tuple[int, int]] | None,
    ) -> list[str]:
        """Keep the workspace within `workspace_mb`: when this call left it over the quota (or
        with more entries than can be walked), remove the files the call created or changed and
        return their names; a workspace already over before the call is left as it was, so that
        its owner can still clean it up."""
        quota = self.settings.workspace_mb * 1024 * 1024
        if before is None:
            return []
        if after is not None and sum(size for _, size in after.values()) <= quota:
            return []
        if after is None:
            after = _walk(workspace, limit=None) or {}
        written = sorted(p for p, meta in after.items() if before.get(p) != meta)
        for rel in written:
            with contextlib.suppress(OSError):
                (workspace / rel).unlink()
        # Folders the call made and left empty go too.
        for dirpath, _, _ in sorted(os.walk(workspace), key=lambda d: -len(d[0])):
            rel = os.path.relpath(dirpath, workspace)
            if rel != "." and not any(p.startswith(rel + os.sep) for p in before):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        return written

    def _limits_json(self, result_fd: int) -> str:
        s = self.settings
        return json.dumps(
            {
                "result_fd": result_fd,
                "cpu": s.cpu_seconds,
                "memory_mb": s.memory_mb,
                "processes": s.max_processes,
                "file_mb": s.max_file_mb,
            }
        )

    def _bwrap_args(self, workspace_fd: int, result_fd: int) -> list[str]:
        bwrap = _bwrap()
        assert bwrap is not None
        args = [
            bwrap,
            "--unshare-all",  # pid, net, ipc, uts, cgroup namespaces
            "--unshare-user",  # required, not just tried as --unshare-all does
            "--disable-userns",  # and no nested user namespace to get round the limits
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        # Merged /usr (Debian 12): /bin, /lib... are links into it; otherwise bind them.
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for path in _ETC_FILES:
            args += ["--ro-bind-try", path, path]
        tmp_bytes = self.settings.max_file_mb * 1024 * 1024
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp",
            "--bind-fd", str(workspace_fd), "/workspace",
            "--chdir", "/workspace",
            "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "MPLBACKEND", "Agg",
            "--setenv", "MPLCONFIGDIR", "/tmp/matplotlib",
            "--setenv", "OPENBLAS_NUM_THREADS", "1",
            "--setenv", "OMP_NUM_THREADS", "1",
            "--",
            SYSTEM_PYTHON, "-I", "-B", "-c", _RUNNER, self._limits_json(result_fd),
        ]  # fmt: skip
        return args

    def _sandbox(
        self,
        code: str,
        workspace: Path,
        *,
        timeout: float,
        cancelled: Callable[[], bool],
        probe: bool = False,
    ) -> _Run:
        cap = self.settings.max_output_chars * 4
        run = _Run(stdout=_Capture(cap), stderr=_Capture(cap), result=_Capture(cap))
        as_root = os.geteuid() == 0
        owner = workspace.stat()
        if as_root and not probe:
            _chown_tree(workspace, SANDBOX_UID, SANDBOX_GID, strip_setid=False)
        workspace_fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        result_read, result_write = os.pipe()
        try:
            # The runner writes the last expression's repr to result_write, inherited through
            # bubblewrap at the same number.
            proc = subprocess.Popen(
                [*(_as_nobody() if as_root else []), *self._bwrap_args(workspace_fd, result_write)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(workspace_fd, result_write),
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(result_write)
            os.close(workspace_fd)
        try:
            self._communicate(proc, code, run, result_read, timeout=timeout, cancelled=cancelled)
        finally:
            os.close(result_read)
            if as_root and not probe:
                _chown_tree(workspace, owner.st_uid, owner.st_gid, strip_setid=True)
        return run

    def _communicate(
        self,
        proc: subprocess.Popen[bytes],
        code: str,
        run: _Run,
        result_read: int,
        *,
        timeout: float,
        cancelled: Callable[[], bool],
    ) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        started = time.monotonic()
        try:
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ, run.stdout)
        selector.register(proc.stderr, selectors.EVENT_READ, run.stderr)
        selector.register(result_read, selectors.EVENT_READ, run.result)
        open_streams = 3
        try:
            while open_streams:
                if time.monotonic() - started > timeout:
                    run.timed_out = True
                    break
                if cancelled():
                    run.cancelled = True
                    break
                for key, _ in selector.select(timeout=0.1):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        key.data.add(chunk)
                    else:
                        selector.unregister(key.fileobj)
                        open_streams -= 1
        finally:
            selector.close()
            if run.timed_out or run.cancelled:
                _kill(proc)
            try:
                run.status = proc.wait(timeout=max(timeout - (time.monotonic() - started), 1.0))
            except subprocess.TimeoutExpired:
                # Streams closed but the sandbox lingers (a child that closed its output).
                run.timed_out = True
                _kill(proc)
                run.status = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        run.seconds = time.monotonic() - started

    # -- the result --------------------------------------------------------------------------

    def _result(
        self,
        run: _Run,
        workspace: Path,
        before: dict[str, tuple[int, int]] | None,
        after: dict[str, tuple[int, int]] | None,
        *,
        over_quota: list[str],
    ) -> ToolResult:
        s = self.settings
        limit = s.max_output_chars
        stdout, stderr = run.stdout.text(limit), run.stderr.text(limit)
        value = run.result.text(limit) if run.result.data else ""
        error = self._stop_reason(run)
        changed: list[str] = []
        if over_quota:
            shown = ", ".join(over_quota[:MAX_CHANGED_FILES])
            error = (
                f"the workspace went over its quota ({s.workspace_mb} MB): the files this call "
                f"wrote were removed ({shown}"
                + (
                    f" and {len(over_quota) - MAX_CHANGED_FILES} more"
                    if len(over_quota) > MAX_CHANGED_FILES
                    else ""
                )
                + ")"
            )
        elif before is not None and after is not None:
            changed = sorted(p for p, meta in after.items() if before.get(p) != meta)
        files = []
        for rel in changed[:MAX_CHANGED_FILES]:
            path = workspace / rel
            mime = _image_mime(path)
            if mime is not None:
                files.append(ToolFile(name=rel, mime=mime, path=path))
        parts = []
        if stdout:
            parts.append(f"stdout:\n{stdout}")
        if stderr:
            parts.append(f"stderr:\n{stderr}")
        if value:
            parts.append(f"result:\n{value}")
        if changed:
            shown = ", ".join(changed[:MAX_CHANGED_FILES])
            more = len(changed) - MAX_CHANGED_FILES
            parts.append(f"files changed: {shown}" + (f" (and {more} more)" if more > 0 else ""))
        if error:
            parts.append(f"error: {error}")
        if not parts:
            parts.append("(no output)")
        text = "\n\n".join(parts)
        if len(text) > MAX_RESULT_CHARS:
            text = text[: MAX_RESULT_CHARS - 20] + "\n… (output cut)"
        data = {
            "stdout": stdout,
            "stderr": stderr,
            "result": value,
            "files": changed[:MAX_CHANGED_FILES],
            "exit_status": run.status,
            "seconds": round(run.seconds, 3),
            "interpreter": SYSTEM_PYTHON,
        }
        return ToolResult(ok=not error, text=text, data=data, files=tuple(files), error=error)

    def _stop_reason(self, run: _Run) -> str:
        """'' when the code ran to its end, else a clear message."""
        s = self.settings
        if run.cancelled:
            return "stopped"
        if run.timed_out:
            return f"stopped: the time limit ({s.timeout_seconds:g} s wall clock) was reached"
        status = run.status
        if status == 0:
            return ""
        if status == _EXIT_SYNTAX:
            return "the code has a syntax error"
        if status == _EXIT_MEMORY:
            return f"stopped: the memory limit ({s.memory_mb} MB) was reached"
        if status == _EXIT_PROCESSES:
            return f"stopped: the process limit ({s.max_processes}) was reached"
        if status == _EXIT_FILE_SIZE:
            return f"stopped: the file-size limit ({s.max_file_mb} MB) was reached"
        if status == _EXIT_NETWORK:
            return "stopped: the sandbox has no network"
        # bubblewrap exits 128 + the signal that killed the code.
        if status in (128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGXCPU):
            return f"stopped: the CPU-time limit ({s.cpu_seconds} s) was reached"
        if status == 128 + signal.SIGXFSZ:
            return f"stopped: the file-size limit ({s.max_file_mb} MB) was reached"
        if status > 128:
            return f"the code was killed by signal {status - 128}"
        return f"the code raised an error (exit status {status})"


@dataclass
class _Run:
    stdout: _Capture
    stderr: _Capture
    result: _Capture
    status: int = 0
    timed_out: bool = False
    cancelled: bool = False
    seconds: float = 0.0


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill bubblewrap's process group; --die-with-parent then takes the whole pid namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()


def _failure(message: str) -> ToolResult:
    return ToolResult(ok=False, text=f"error: {message}", error=message)


def tools(settings: PythonSettings) -> list[Tool]:
    """The python group's tools (the registry calls this)."""
    return [PythonTool(settings)]
