"""Apply-patch tools: a unified diff applied to the conversation's workspace, a git repository.

`apply_patch` previews (dry run: the hunks, and whether they apply) or applies and commits a diff;
`rollback_patch` reverts the last applied patch that is not rolled back yet. Git runs with a clean
environment: no system or global config, `HOME` at an empty folder, hooks and fsmonitor off, and the
repository's own `.git/config` rewritten before every call, because other tools (sandboxed Python)
write in the same workspace and a planted config could otherwise make git run a command.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from inference.tools.base import MAX_RESULT_CHARS, Tool, ToolContext, ToolResult

__all__ = ["PatchSettings", "tools"]

# Trailers on our commits: how rollback finds the last applied patch.
APPLIED_TRAILER = "Mlxweb-Patch: applied"
ROLLBACK_TRAILER = "Mlxweb-Rollback-Of:"

# The repository's whole config, written before each call (see the module's docstring).
REPO_CONFIG = """\
[core]
\trepositoryformatversion = 0
\tfilemode = true
\tbare = false
\tlogallrefupdates = true
\tsymlinks = true
[user]
\tname = mlxweb
\temail = mlxweb@localhost
"""

# Hardened options on every git command line: these win over any config git would read.
GIT_OPTIONS = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.pager=cat",
    "-c", "core.untrackedCache=false",
    "-c", "protocol.allow=never",
    "-c", "commit.gpgSign=false",
    "-c", "user.name=mlxweb",
    "-c", "user.email=mlxweb@localhost",
)  # fmt: skip


class PatchSettings(BaseModel):
    """Limits of the apply-patch tools (the `tools.patch` section of the server config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_diff_bytes: int = Field(default=200_000, ge=1_000, le=5_000_000)
    max_files: int = Field(default=50, ge=1, le=1_000)
    git_timeout: float = Field(default=30.0, gt=0, le=300)


class PatchError(Exception):
    """A refusal or failure with the message shown to the model and the user."""


@dataclass
class Hunk:
    header: str
    old_start: int
    added: int = 0
    removed: int = 0


@dataclass
class FileChange:
    old_path: str | None  # None for a new file
    new_path: str | None  # None for a deleted file
    hunks: list[Hunk] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""

    @property
    def status(self) -> str:
        if self.old_path is None:
            return "added"
        if self.new_path is None:
            return "deleted"
        if self.old_path != self.new_path:
            return "renamed"
        return "modified"

    def as_data(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "old_path": self.old_path,
            "status": self.status,
            "added": sum(h.added for h in self.hunks),
            "removed": sum(h.removed for h in self.hunks),
            "hunks": [
                {"header": h.header, "added": h.added, "removed": h.removed} for h in self.hunks
            ],
        }


_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")


def _header_path(raw: str) -> str | None:
    """The path of a `---`/`+++` line's value, None for /dev/null."""
    value = raw.split("\t", 1)[0].strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        value = value[1:-1]
    return None if value == "/dev/null" else value


def parse_diff(diff: str) -> tuple[list[FileChange], int]:
    """The files and hunks of a unified diff, and the `-p` strip level git must use.

    Models write both `a/x b/x` diffs and plain `x x` ones: the prefixes are stripped only when
    every header has them.
    """
    changes: list[FileChange] = []
    current: FileChange | None = None
    lines = diff.splitlines()
    raw_paths: list[str] = []
    for index, line in enumerate(lines):
        if line.startswith("GIT binary patch") or (
            line.startswith("Binary files ") and line.endswith(" differ")
        ):
            raise PatchError("binary patches are refused: send a text diff")
        if line.startswith(("new file mode 120000", "new mode 120000", "old mode 120000")):
            raise PatchError("patches that create or change symbolic links are refused")
        if (
            line.startswith("--- ")
            and index + 1 < len(lines)
            and lines[index + 1].startswith("+++ ")
        ):
            old = _header_path(line[4:])
            new = _header_path(lines[index + 1][4:])
            raw_paths += [p for p in (old, new) if p is not None]
            current = FileChange(old_path=old, new_path=new)
            changes.append(current)
            continue
        if line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            # Path-only changes (no hunks) are not in ---/+++ lines: checked as paths all the same.
            raw_paths.append("a/" + line.split(" ", 2)[2])
            continue
        match = _HUNK_RE.match(line)
        if match and current is not None:
            current.hunks.append(Hunk(header=match[0], old_start=int(match[1])))
            continue
        if current is not None and current.hunks and not line.startswith(("+++", "---")):
            if line.startswith("+"):
                current.hunks[-1].added += 1
            elif line.startswith("-"):
                current.hunks[-1].removed += 1
    if not changes:
        raise PatchError(
            "no file changes found: send a unified diff with ---/+++ headers and @@ hunks"
        )
    strip = 1 if raw_paths and all(p.startswith(("a/", "b/")) for p in raw_paths) else 0
    for change in changes:
        if strip:
            change.old_path = change.old_path[2:] if change.old_path else None
            change.new_path = change.new_path[2:] if change.new_path else None
    for raw in raw_paths:
        _check_relative(raw[2:] if strip and raw.startswith(("a/", "b/")) else raw)
    return changes, strip


def _check_relative(path: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or path.startswith("~") or "\\" in path:
        raise PatchError(f"path {path!r} is outside the workspace: use a relative path")
    if any(part == ".." for part in pure.parts):
        raise PatchError(f"path {path!r} leaves the workspace ('..' is refused)")
    if any(part.lower() == ".git" for part in pure.parts):
        raise PatchError(f"path {path!r} is inside the workspace's git repository")


def _check_inside(workspace: Path, path: str) -> None:
    """Refuse a path through (or to) a symbolic link, or one that resolves outside the workspace."""
    root = workspace.resolve()
    current = workspace
    for part in PurePosixPath(path).parts:
        current = current / part
        if current.is_symlink():
            raise PatchError(f"path {path!r} goes through a symbolic link ({part!r}): refused")
    if not (root / path).resolve().is_relative_to(root):
        raise PatchError(f"path {path!r} is outside the workspace")


def _cap(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[: MAX_RESULT_CHARS - 20] + "\n… (truncated)"


class Workspace:
    """The conversation's folder as a git repository, driven with a clean, hardened environment."""

    def __init__(self, path: Path, settings: PatchSettings) -> None:
        self.path = path
        self.settings = settings
        self.git_dir = path / ".git"

    def git(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory(prefix="mlxweb-git-home-") as home:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": home,
                "XDG_CONFIG_HOME": home,
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": os.devnull,
                "GIT_ATTR_NOSYSTEM": "1",
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_DIR": str(self.git_dir),
                "GIT_WORK_TREE": str(self.path),
                "GIT_CEILING_DIRECTORIES": str(self.path.parent),
                "LC_ALL": "C",
            }
            try:
                done = subprocess.run(
                    ["git", *GIT_OPTIONS, *args],
                    cwd=self.path,
                    env=env,
                    input=input,
                    capture_output=True,
                    text=True,
                    timeout=self.settings.git_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise PatchError(
                    f"git {args[0]} took longer than {self.settings.git_timeout:g} s"
                ) from exc
            except FileNotFoundError as exc:
                raise PatchError("git is not installed on the server") from exc
        if check and done.returncode != 0:
            raise PatchError(f"git {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done

    def prepare(self, *, snapshot: bool = True) -> None:
        """Init on first use; otherwise check the repository is ours and reset its config."""
        if self.git_dir.is_symlink() or (self.git_dir.exists() and not self.git_dir.is_dir()):
            raise PatchError("the workspace's .git is not a plain folder: refused")
        if not self.git_dir.exists():
            self.git("init", "--quiet", "--initial-branch=main")
        for planted in ("commondir", "gitdir"):
            if (self.git_dir / planted).exists():
                raise PatchError(f"the workspace's .git has a {planted!r} file: refused")
        (self.git_dir / "config").write_text(REPO_CONFIG)
        if snapshot:
            self.snapshot()

    def snapshot(self) -> None:
        """Commit what other tools changed since, so a patch's commit holds only the patch."""
        self.git("add", "--all")
        if (
            self.git("diff", "--cached", "--quiet", check=False).returncode != 0
            or not self.has_commits()
        ):
            self.git("commit", "--quiet", "--allow-empty", "--no-verify", "-m", "workspace changes")

    def has_commits(self) -> bool:
        return self.git("rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode == 0

    def last_applied(self) -> tuple[str, str] | None:
        """The newest applied patch's commit and subject that no rollback has reverted yet."""
        log = self.git("log", "--format=%H%x00%s%x00%B%x1e").stdout
        rolled_back: set[str] = set()
        for entry in log.split("\x1e"):
            if not entry.strip():
                continue
            sha, subject, body = entry.strip("\n").split("\x00", 2)
            for line in body.splitlines():
                if line.startswith(ROLLBACK_TRAILER):
                    rolled_back.add(line.removeprefix(ROLLBACK_TRAILER).strip())
            if APPLIED_TRAILER in body.splitlines() and sha not in rolled_back:
                return sha, subject
        return None


def _conflict_message(stderr: str, changes: list[FileChange]) -> str:
    """Name the hunk git could not apply, from its `patch failed: <file>:<line>` line."""
    messages = []
    for match in re.finditer(r"patch failed: (.+):(\d+)", stderr):
        path, line = match[1], int(match[2])
        for change in changes:
            if path not in (change.path, change.old_path):
                continue
            for number, hunk in enumerate(change.hunks, start=1):
                if hunk.old_start == line:
                    messages.append(
                        f"hunk {number} of {len(change.hunks)} in {path} ({hunk.header}) "
                        "does not apply: the lines it expects are not in the file"
                    )
                    break
            else:
                messages.append(f"a hunk in {path} at line {line} does not apply")
    if not messages:
        details = [line.removeprefix("error: ") for line in stderr.splitlines() if line.strip()]
        messages = details or ["the patch does not apply"]
    return "conflict: " + "; ".join(messages)


def _preview(changes: list[FileChange]) -> str:
    lines = []
    for change in changes:
        added = sum(h.added for h in change.hunks)
        removed = sum(h.removed for h in change.hunks)
        name = (
            f"{change.old_path} -> {change.new_path}" if change.status == "renamed" else change.path
        )
        lines.append(f"{name} ({change.status}, +{added} -{removed})")
        lines += [f"  {h.header} +{h.added} -{h.removed}" for h in change.hunks]
    return "\n".join(lines)


def _failure(error: str, **data: Any) -> ToolResult:
    return ToolResult(ok=False, text=_cap(error), error=error, data=data)


class ApplyPatchTool:
    """`apply_patch` {diff, dry_run}: preview or apply and commit a unified diff."""

    name = "apply_patch"
    description = (
        "Apply a unified diff (git style, paths relative to the workspace) to the conversation's "
        "workspace. With dry_run true, show the files and hunks and check that they apply, "
        "changing nothing. Each applied patch is committed and can be undone with rollback_patch."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {
            "diff": {"type": "string", "description": "The unified diff to apply."},
            "dry_run": {
                "type": "boolean",
                "description": "Only preview and check the patch.",
                "default": False,
            },
        },
        "required": ["diff"],
        "additionalProperties": False,
    }
    # The contract's "mutating unless dry_run" cannot be one bool: a dry run waits for approval too.
    mutating = True

    def __init__(self, settings: PatchSettings) -> None:
        self.settings = settings

    def availability(self) -> str | None:
        try:
            subprocess.run(["git", "--version"], capture_output=True, check=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return "git is not installed on the server"
        return None

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        diff = arguments.get("diff")
        dry_run = arguments.get("dry_run", False)
        if not isinstance(diff, str) or not diff.strip():
            return _failure("'diff' must be a non-empty string holding a unified diff")
        if not isinstance(dry_run, bool):
            return _failure("'dry_run' must be true or false")
        if len(diff.encode()) > self.settings.max_diff_bytes:
            return _failure(
                f"the diff is larger than {self.settings.max_diff_bytes} bytes: send smaller ones"
            )
        if "\x00" in diff:
            return _failure("binary patches are refused: send a text diff")
        if not diff.endswith("\n"):
            diff += "\n"
        try:
            return self._run(diff, dry_run, context)
        except PatchError as exc:
            return _failure(str(exc))

    def _run(self, diff: str, dry_run: bool, context: ToolContext) -> ToolResult:
        changes, strip = parse_diff(diff)
        if len(changes) > self.settings.max_files:
            raise PatchError(
                f"the diff changes {len(changes)} files, more than {self.settings.max_files}"
            )
        for change in changes:
            for path in {change.old_path, change.new_path} - {None}:
                _check_inside(context.workspace, str(path))
        workspace = Workspace(context.workspace, self.settings)
        # A dry run leaves the history alone: other tools' changes are committed before an apply.
        workspace.prepare(snapshot=not dry_run)
        data: dict[str, Any] = {"files": [c.as_data() for c in changes], "dry_run": dry_run}
        preview = _preview(changes)
        options = [f"-p{strip}", "--whitespace=nowarn"]
        check = workspace.git("apply", "--check", *options, "-", input=diff, check=False)
        if check.returncode != 0:
            error = _conflict_message(check.stderr, changes)
            return ToolResult(ok=False, text=_cap(f"{error}\n\n{preview}"), error=error, data=data)
        if dry_run:
            return ToolResult(
                ok=True, text=_cap(f"dry run: the patch applies cleanly\n\n{preview}"), data=data
            )
        if context.cancelled():
            return _failure("stopped")
        workspace.git("apply", *options, "-", input=diff)
        workspace.git("add", "--all")
        summary = ", ".join(c.path for c in changes[:5]) + (" …" if len(changes) > 5 else "")
        workspace.git(
            "commit",
            "--quiet",
            "--no-verify",
            "-m",
            f"apply_patch: {summary}",
            "-m",
            APPLIED_TRAILER,
        )
        data["commit"] = workspace.git("rev-parse", "HEAD").stdout.strip()
        return ToolResult(ok=True, text=_cap(f"applied and committed\n\n{preview}"), data=data)


class RollbackPatchTool:
    """`rollback_patch` {}: revert the last applied patch (refused when there is none)."""

    name = "rollback_patch"
    description = "Undo the last patch applied with apply_patch in the conversation's workspace."
    parameters: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    mutating = True

    def __init__(self, settings: PatchSettings) -> None:
        self.settings = settings

    def availability(self) -> str | None:
        return ApplyPatchTool(self.settings).availability()

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        if arguments:
            return _failure("rollback_patch takes no arguments")
        try:
            return self._run(context)
        except PatchError as exc:
            return _failure(str(exc))

    def _run(self, context: ToolContext) -> ToolResult:
        if not (context.workspace / ".git").exists():
            raise PatchError("there is no applied patch to roll back")
        workspace = Workspace(context.workspace, self.settings)
        workspace.prepare()
        last = workspace.last_applied()
        if last is None:
            raise PatchError("there is no applied patch to roll back")
        sha, subject = last
        reverse = workspace.git("diff", "--full-index", f"{sha}~1", sha).stdout
        check = workspace.git("apply", "-R", "--check", "-", input=reverse, check=False)
        if check.returncode != 0:
            changes, _ = parse_diff(reverse)
            error = _conflict_message(check.stderr, changes).replace(
                "conflict:", "conflict: the files changed since the patch;", 1
            )
            return _failure(error, commit=sha)
        workspace.git("apply", "-R", "--index", "-", input=reverse)
        workspace.git(
            "commit", "--quiet", "--no-verify", "--allow-empty",
            "-m", f"rollback_patch: {subject}", "-m", f"{ROLLBACK_TRAILER} {sha}",
        )  # fmt: skip
        text = f"rolled back {subject.removeprefix('apply_patch: ')} (commit {sha[:12]})"
        return ToolResult(ok=True, text=text, data={"rolled_back": sha})


def tools(settings: PatchSettings) -> list[Tool]:
    """The apply-patch tools."""
    return [ApplyPatchTool(settings), RollbackPatchTool(settings)]
