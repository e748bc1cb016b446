"""`manage.py models`: the library on the command line, with the page's validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from mlxweb.config import BASE_DIR
from models_admin.models import ModelJob
from tests.support.fake_hub import TINY_REPO, FakeHub
from tests.support.gguf_imports import place

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = StringIO()
    call_command("models", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_it_lists_the_library(library: Path, tiny_hf_dir: Path) -> None:
    text = run("list")
    rows = [json.loads(line) for line in run("list", "--json").splitlines()]

    assert "tiny-hf  [models folder]  LlamaForCausalLM" in text
    assert "1 model(s), " in text
    assert rows[0]["name"] == "tiny-hf" and rows[0]["loadable"] is True
    assert rows[0]["chat_template"] is True


def test_it_pulls_in_process_and_records_the_job(
    library: Path, fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    text = run("pull", TINY_REPO, "--name", "tiny")

    job = ModelJob.objects.get()
    assert job.state == ModelJob.State.SUCCEEDED
    assert job.worker.startswith("cli@")
    assert "Done:" in text and '"linked_as": "tiny"' in text
    assert (library / "tiny").is_symlink()


def test_it_converts_in_process(library: Path, tiny_hf_dir: Path) -> None:
    text = run("convert", "tiny-hf", "-q", "--bits", "4")

    assert "Done:" in text
    assert (library / "tiny-hf-4bit" / "config.json").is_file()


def test_it_hands_a_job_to_the_worker_with_background(
    library: Path, enqueued: list[dict[str, Any]]
) -> None:
    text = run("pull", "org/model", "--background")

    job = ModelJob.objects.get()
    assert job.state == ModelJob.State.QUEUED
    assert f"job {job.code}" in text
    assert enqueued[0]["task_id"] == job.task_id


def test_it_deletes_with_yes(library: Path, tiny_hf_dir: Path) -> None:
    text = run("delete", "tiny-hf", "--yes")

    assert "Deleting tiny-hf frees" in text and "Done:" in text
    assert not tiny_hf_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "not a repo"], "repo-id: Give a hub repository id"),
        (["convert", "tiny-hf", "-q", "--bits", "7"], "bits: Select a valid choice"),
        (["convert", "tiny-hf", "--recipe", "mixed_3_6"], "recipe: Mixed precision quantizes"),
        (["convert", "/etc"], "source: /etc is outside the models folder"),
        (["quantize", "tiny-hf", "--bits", "4"], "not an MLX model"),
        (["delete", "no-such-model", "--yes"], "source: No model 'no-such-model'"),
    ],
)
def test_it_refuses_bad_arguments_with_status_2(
    library: Path, tiny_hf_dir: Path, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as error:
        run(*args)

    assert error.value.returncode == 2
    assert message in str(error.value)
    assert not ModelJob.objects.exists()


def test_it_imports_a_gguf_in_process(library: Path, smollm2_gguf: Path) -> None:
    source = place(smollm2_gguf, library / "gguf")

    text = run("import-gguf", str(source), "--name", "smol")

    assert "Import SmolLM2-135M-Instruct.Q4_1.gguf as smol (job " in text
    assert '"stored": "kept 210 Q4_1, 1 Q8_0"' in text
    assert (library / "smol" / "mlxweb_source.json").is_file()


def test_it_prints_a_validation_as_a_summary(
    library: Path, tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("convert", "tiny-hf", "--name", "tiny-f16", "--dtype", "float16")

    text = run("validate", "tiny-f16", "--tokens", "4")

    assert "Done: tiny-f16 vs tiny-hf: token agreement 100%" in text
    assert "What is the capital of France? Answer briefly. [4/4 same]" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import-gguf", "/etc/passwd"], "path: /etc/passwd is outside the folders"),
        (["import-gguf", "{gguf}", "--bits", "7"], "bits: Select a valid choice"),
        (["import-gguf", "{gguf}", "--group-size", "48"], "group-size: Select a valid choice"),
        (["import-gguf", "{gguf}", "--name", "tiny-hf"], "name: A model named 'tiny-hf'"),
        (["validate", "tiny-hf"], "source: tiny-hf is not an MLX model."),
        (["validate", "tiny-hf", "--tokens", "0"], "n-tokens: Ensure this value is greater"),
    ],
)
def test_it_refuses_bad_import_and_validate_arguments_with_status_2(
    library: Path, tiny_hf_dir: Path, args: list[str], message: str
) -> None:
    gguf = library / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))

    with pytest.raises(CommandError) as error:
        run(*[a.format(gguf=gguf) for a in args])

    assert error.value.returncode == 2
    assert message in str(error.value)
    assert not ModelJob.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import-gguf", "/etc/passwd", "--bits", "4"], "path: /etc/passwd is outside the folders"),
        (["validate", "no-such-model"], "source: No model 'no-such-model'"),
    ],
)
def test_import_and_validate_exit_with_status_2_on_the_command_line(
    library: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    env = {**os.environ, "MLXWEB_MODELS_DIR": str(library), "MLXWEB_VAR_DIR": str(tmp_path)}
    env["MLXWEB_DATABASE_URL"] = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    if args[0] == "validate":  # finding the model reads the library's table
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=BASE_DIR, env=env, check=True
        )
    result = subprocess.run(
        [sys.executable, "manage.py", "models", *args],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_it_exits_with_status_2_on_the_command_line(library: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MLXWEB_MODELS_DIR": str(library), "MLXWEB_VAR_DIR": str(tmp_path)}
    env["MLXWEB_DATABASE_URL"] = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    result = subprocess.run(
        [sys.executable, "manage.py", "models", "pull", "not/a/repo"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "repo-id: Give a hub repository id" in result.stderr
