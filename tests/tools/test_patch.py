"""apply_patch and rollback_patch on a temporary workspace: a real git repository, no mocks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from inference.tools.base import ToolContext
from inference.tools.patch import ApplyPatchTool, PatchSettings, RollbackPatchTool, tools

GREETING = "def greet(name):\n    return 'hello ' + name\n\n\nprint(greet('world'))\n"

CHANGE_GREETING = (
    """\
diff --git a/app.py b/app.py
--- a/app.py
+++ b/app.py
@@ -1,3 +1,4 @@
 def greet(name):
-    return 'hello ' + name
+    # Greets politely.
+    return 'good morning ' + name
"""
    + " \n"
)  # the blank context line after the change

NEW_FILE = """\
--- /dev/null
+++ b/notes/todo.txt
@@ -0,0 +1,2 @@
+buy milk
+write tests
"""


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "conversation"
    folder.mkdir()
    (folder / "app.py").write_text(GREETING)
    return folder


@pytest.fixture
def context(workspace: Path) -> ToolContext:
    return ToolContext(workspace=workspace, cancelled=lambda: False)


@pytest.fixture
def apply_patch() -> ApplyPatchTool:
    return ApplyPatchTool(PatchSettings())


@pytest.fixture
def rollback_patch() -> RollbackPatchTool:
    return RollbackPatchTool(PatchSettings())


def _log(workspace: Path) -> list[str]:
    done = subprocess.run(
        ["git", "log", "--format=%s"], cwd=workspace, capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def test_it_offers_both_tools_named_as_the_contract_says() -> None:
    built = tools(PatchSettings())
    assert [t.name for t in built] == ["apply_patch", "rollback_patch"]
    assert all(t.mutating and t.availability() is None for t in built)


def test_it_applies_a_clean_patch_and_commits_it(
    apply_patch: ApplyPatchTool, context: ToolContext, workspace: Path
) -> None:
    result = apply_patch.run({"diff": CHANGE_GREETING + NEW_FILE}, context)

    assert result.ok, result.error
    assert "good morning" in (workspace / "app.py").read_text()
    assert (workspace / "notes" / "todo.txt").read_text() == "buy milk\nwrite tests\n"
    assert [f["path"] for f in result.data["files"]] == ["app.py", "notes/todo.txt"]
    assert result.data["files"][0]["added"] == 2 and result.data["files"][0]["removed"] == 1
    assert result.data["files"][1]["status"] == "added"
    assert _log(workspace)[0] == "apply_patch: app.py, notes/todo.txt"


def test_it_applies_a_diff_without_a_b_prefixes(
    apply_patch: ApplyPatchTool, context: ToolContext, workspace: Path
) -> None:
    plain = CHANGE_GREETING.replace("a/app.py", "app.py").replace("b/app.py", "app.py")

    result = apply_patch.run({"diff": plain}, context)

    assert result.ok, result.error
    assert "good morning" in (workspace / "app.py").read_text()


def test_a_dry_run_previews_the_hunks_and_changes_nothing(
    apply_patch: ApplyPatchTool, context: ToolContext, workspace: Path
) -> None:
    result = apply_patch.run({"diff": CHANGE_GREETING + NEW_FILE, "dry_run": True}, context)

    assert result.ok, result.error
    assert "applies cleanly" in result.text
    assert "app.py (modified, +2 -1)" in result.text
    assert "@@ -1,3 +1,4 @@ +2 -1" in result.text
    assert result.data["files"][0]["hunks"] == [
        {"header": "@@ -1,3 +1,4 @@", "added": 2, "removed": 1}
    ]
    assert (workspace / "app.py").read_text() == GREETING
    assert not (workspace / "notes").exists()
    assert (
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True).returncode
        != 0
    )


def test_it_reports_a_conflict_naming_the_hunk_and_changes_nothing(
    apply_patch: ApplyPatchTool, context: ToolContext, workspace: Path
) -> None:
    edited = GREETING.replace("'hello '", "'hi '")
    (workspace / "app.py").write_text(edited)

    for dry_run in (True, False):
        result = apply_patch.run({"diff": CHANGE_GREETING, "dry_run": dry_run}, context)

        assert not result.ok
        assert result.error.startswith(
            "conflict: hunk 1 of 1 in app.py (@@ -1,3 +1,4 @@) does not apply"
        )
        assert (workspace / "app.py").read_text() == edited


def test_it_rolls_back_the_last_patch_then_the_one_before(
    apply_patch: ApplyPatchTool,
    rollback_patch: RollbackPatchTool,
    context: ToolContext,
    workspace: Path,
) -> None:
    assert apply_patch.run({"diff": CHANGE_GREETING}, context).ok
    assert apply_patch.run({"diff": NEW_FILE}, context).ok

    first = rollback_patch.run({}, context)
    assert first.ok, first.error
    assert "notes/todo.txt" in first.text
    assert not (workspace / "notes" / "todo.txt").exists()
    assert "good morning" in (workspace / "app.py").read_text()

    second = rollback_patch.run({}, context)
    assert second.ok, second.error
    assert (workspace / "app.py").read_text() == GREETING

    third = rollback_patch.run({}, context)
    assert not third.ok
    assert third.error == "there is no applied patch to roll back"


def test_rollback_keeps_changes_other_tools_made_since(
    apply_patch: ApplyPatchTool,
    rollback_patch: RollbackPatchTool,
    context: ToolContext,
    workspace: Path,
) -> None:
    assert apply_patch.run({"diff": NEW_FILE}, context).ok
    (workspace / "result.csv").write_text("a,b\n")

    assert rollback_patch.run({}, context).ok

    assert not (workspace / "notes" / "todo.txt").exists()
    assert (workspace / "result.csv").read_text() == "a,b\n"


def test_rollback_is_refused_when_nothing_was_applied(
    rollback_patch: RollbackPatchTool, context: ToolContext
) -> None:
    result = rollback_patch.run({}, context)

    assert not result.ok
    assert result.error == "there is no applied patch to roll back"


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("/dev/null", "/etc/evil", "outside the workspace"),
        ("/dev/null", "b/../evil", "leaves the workspace"),
        ("/dev/null", "../evil", "leaves the workspace"),
        ("/dev/null", "b/.git/hooks/pre-commit", "git repository"),
        ("/dev/null", "b/link/evil", "symbolic link"),
    ],
)
def test_it_refuses_paths_that_escape_the_workspace(
    apply_patch: ApplyPatchTool,
    context: ToolContext,
    workspace: Path,
    old: str,
    new: str,
    reason: str,
) -> None:
    outside = workspace.parent / "outside"
    outside.mkdir()
    (workspace / "link").symlink_to(outside)
    diff = f"--- {old}\n+++ {new}\n@@ -0,0 +1 @@\n+owned\n"

    result = apply_patch.run({"diff": diff}, context)

    assert not result.ok
    assert reason in result.error
    assert not (outside / "evil").exists()
    assert not (workspace.parent / "evil").exists()


def test_it_refuses_binary_and_oversized_patches_and_bad_arguments(
    context: ToolContext, workspace: Path
) -> None:
    tool = ApplyPatchTool(PatchSettings(max_diff_bytes=1_000))
    binary = (
        "diff --git a/x.bin b/x.bin\nnew file mode 100644\nGIT binary patch\nliteral 3\nKcmZ>\n\n"
    )

    assert "binary" in tool.run({"diff": binary}, context).error
    assert "larger than 1000 bytes" in tool.run({"diff": NEW_FILE * 100}, context).error
    assert "non-empty string" in tool.run({}, context).error
    assert "true or false" in tool.run({"diff": NEW_FILE, "dry_run": "yes"}, context).error
    assert "no file changes" in tool.run({"diff": "hello"}, context).error
    assert not (workspace / "x.bin").exists()


def test_a_planted_repository_config_runs_nothing(
    apply_patch: ApplyPatchTool, context: ToolContext, workspace: Path
) -> None:
    assert apply_patch.run({"diff": NEW_FILE}, context).ok
    marker = workspace.parent / "pwned"
    config = workspace / ".git" / "config"
    config.write_text(config.read_text() + f"[core]\n\tfsmonitor = touch {marker}\n")
    hook = workspace / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)

    assert apply_patch.run({"diff": CHANGE_GREETING}, context).ok
    assert not marker.exists()
