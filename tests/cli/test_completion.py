"""`mlxweb completion`: scripts that bash sources and completes with, through argcomplete's
environment protocol (the shell calls `mlxweb` with `_ARGCOMPLETE` and `COMP_LINE` set)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import MLXWEB, ROOT


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_ARC", "COMP_"))}
    env["PATH"] = f"{MLXWEB.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash_complete(line: str) -> list[str]:
    """What bash offers for `line` (the cursor at its end) with the sourced script."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    script = f"""
source <(mlxweb completion bash)
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}
COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}
_python_argcomplete mlxweb
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(
        ["bash", "-c", script], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [word.strip() for word in result.stdout.splitlines() if word.strip()]


def test_bash_sources_the_script_and_registers_it() -> None:
    result = subprocess.run(
        ["bash", "-c", "source <(mlxweb completion bash) && complete -p mlxweb"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "-F _python_argcomplete mlxweb" in result.stdout


def test_bash_completes_verbs_options_presets_and_model_ids() -> None:
    assert bash_complete("mlxweb pu") == ["pull"]
    assert "import-gguf" in bash_complete("mlxweb im")
    assert bash_complete("mlxweb list --so") == ["--sort"]
    assert bash_complete("mlxweb run --preset ") == ["balanced", "creative", "deterministic"]
    assert bash_complete("mlxweb run smollm2") == ["smollm2-135m-instruct"]


def test_it_answers_argcompletes_environment_protocol(tmp_path: Path) -> None:
    line = "mlxweb completion "
    out = tmp_path / "completions"
    env = {
        **_env(),
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }

    result = subprocess.run([str(MLXWEB)], env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    offered = out.read_text().split()
    assert {"bash", "zsh", "fish"} <= set(offered) and "run" not in offered


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_it_prints_zsh_and_fish_scripts(shell: str) -> None:
    result = subprocess.run(
        [str(MLXWEB), "completion", shell], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0
    assert "mlxweb" in result.stdout and "_ARGCOMPLETE" in result.stdout
    if shutil.which(shell):  # the shell parses it
        check = ["zsh", "-n"] if shell == "zsh" else ["fish", "--no-execute"]
        parsed = subprocess.run(check, input=result.stdout, text=True, capture_output=True)
        assert parsed.returncode == 0, parsed.stderr


def test_an_unknown_shell_exits_with_status_2() -> None:
    result = subprocess.run(
        [str(MLXWEB), "completion", "tcsh"], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("command", [[str(MLXWEB)], [sys.executable, "-m", "mlxweb"]])
def test_the_script_and_python_m_run_the_same_command(command: list[str], tmp_path: Path) -> None:
    """Both re-run themselves with OpenBLAS preloaded (python -m as a module, or mlxweb/ would
    shadow Celery) and report on their own data folder."""
    env = {
        k: v for k, v in _env().items() if k not in ("MLXWEB_BLAS_PRELOADED", "LD_PRELOAD")
    }
    env |= {"MLXWEB_VAR_DIR": str(tmp_path / "var"), "MLXWEB_PORT": "9"}
    env.pop("MLXWEB_DATABASE_URL", None)

    result = subprocess.run(
        [*command, "status", "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 1, result.stderr  # no server on port 9
    assert '"running": false' in result.stdout
    assert (tmp_path / "var" / "secret_key").is_file()  # the launcher's steps ran
