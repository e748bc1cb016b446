"""`mlxweb list`, `jobs` and the job verbs: `manage.py models` underneath, with exit codes
and JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models_admin.models import ModelJob
from tests.support.fake_hub import TINY_REPO, FakeHub
from tests.support.gguf_imports import place

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_lists_the_library_as_a_table(library: Path, tiny_hf_dir: Path, cli: Any) -> None:
    result = cli("list")

    assert result.code == 0
    assert "tiny-hf" in result.out and "LlamaForCausalLM" in result.out
    assert "1 model(s)" in result.out


def test_it_lists_the_library_as_one_json_document(
    library: Path, tiny_hf_dir: Path, cli: Any
) -> None:
    result = cli("list", "--json", "--sort", "size")

    rows = json.loads(result.out)
    assert result.code == 0
    assert [row["name"] for row in rows] == ["tiny-hf"]
    assert rows[0]["loadable"] is True and rows[0]["chat_template"] is True


def test_it_filters_the_list_like_manage_py(library: Path, tiny_hf_dir: Path, cli: Any) -> None:
    assert json.loads(cli("list", "--json", "--filter", "nothing-like-it").out) == []


def test_it_pulls_through_the_same_job_as_manage_py(
    library: Path, fake_hub: FakeHub, cli: Any
) -> None:
    result = cli("pull", TINY_REPO, "--name", "tiny")

    job = ModelJob.objects.get()
    assert result.code == 0, result.err
    assert job.kind == "pull" and job.state == ModelJob.State.SUCCEEDED
    assert job.worker.startswith("cli@")
    assert '"linked_as": "tiny"' in result.out
    assert (library / "tiny").is_symlink()


def test_it_converts_quantizes_validates_and_deletes(
    library: Path, tiny_hf_dir: Path, cli: Any
) -> None:
    converted = cli("convert", "tiny-hf", "--name", "tiny-f16", "--dtype", "float16")
    quantized = cli("quantize", "tiny-f16", "--bits", "4", "--name", "tiny-4bit")
    validated = cli("validate", "tiny-f16", "--tokens", "4")
    deleted = cli("delete", "tiny-4bit", "--yes")

    assert [converted.code, quantized.code, validated.code, deleted.code] == [0, 0, 0, 0]
    assert "Done: tiny-f16 vs tiny-hf: token agreement 100%" in validated.out
    assert "Deleting tiny-4bit frees" in deleted.out
    assert (library / "tiny-f16" / "config.json").is_file()
    assert not (library / "tiny-4bit").exists()
    kinds = set(ModelJob.objects.values_list("kind", flat=True))
    assert kinds == {"convert", "quantize", "validate", "delete"}


def test_it_imports_a_gguf(library: Path, smollm2_gguf: Path, cli: Any) -> None:
    source = place(smollm2_gguf, library / "gguf")

    result = cli("import-gguf", str(source), "--name", "smol")

    assert result.code == 0, result.err
    assert '"stored": "kept 210 Q4_1, 1 Q8_0"' in result.out
    assert (library / "smol" / "mlxweb_source.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "not a repo"], "repo-id: Give a hub repository id"),
        (["convert", "tiny-hf", "-q", "--bits", "7"], "bits: Select a valid choice"),
        (["delete", "no-such-model", "--yes"], "source: No model 'no-such-model'"),
        (["import-gguf", "/etc/passwd"], "path: /etc/passwd is outside the folders"),
    ],
)
def test_input_the_forms_refuse_exits_with_status_2(
    library: Path, tiny_hf_dir: Path, cli: Any, args: list[str], message: str
) -> None:
    result = cli(*args)

    assert result.code == 2
    assert message in result.err
    assert not ModelJob.objects.exists()


@pytest.mark.parametrize(
    "args", [["pull"], ["no-such-verb"], ["list", "--sort", "colour"], ["quantize", "x"]]
)
def test_a_bad_command_line_exits_with_status_2(cli: Any, args: list[str]) -> None:
    result = cli(*args)

    assert result.code == 2
    assert "usage: mlxweb" in result.err


def test_a_failed_job_exits_with_status_1(library: Path, fake_hub: FakeHub, cli: Any) -> None:
    result = cli("pull", "test-org/not-on-the-hub")

    assert result.code == 1
    assert ModelJob.objects.get().state == ModelJob.State.FAILED


def test_it_lists_jobs_as_json(library: Path, running_job: ModelJob, cli: Any) -> None:
    table = cli("jobs")
    jobs = json.loads(cli("jobs", "--json").out)

    assert table.code == 0 and str(running_job.code) in table.out
    assert jobs[0]["code"] == str(running_job.code)
    assert jobs[0]["state"] == "running" and jobs[0]["percent"] == 75.0


def test_export_gguf_is_wired_to_manage_py_models(cli: Callable[..., Any]) -> None:
    """Until `manage.py models export-gguf` exists the verb says so (status 2); once it does,
    `mlxweb export-gguf --help` is that command's own help."""
    from mlxweb.cli.library import _models_parsers

    result = cli("export-gguf", "--help")

    if "export-gguf" in _models_parsers()[0]:
        assert result.code == 0 and "usage: mlxweb export-gguf" in result.out
    else:
        missing = cli("export-gguf", "some-model", "/tmp/out.gguf")
        assert missing.code == 2 and "not in this version" in missing.err
