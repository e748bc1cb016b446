"""models_admin.services.model_validate: a model made here compared with what it was made from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models_admin import services
from models_admin.models import ModelJob
from tests.support.gguf_imports import SessionImport

pytestmark = pytest.mark.django_db(transaction=True)


def validate_job(source: Path, **options: Any) -> ModelJob:
    params = {"source": str(source), **options}
    job = services.job_create(kind="validate", params=params, enqueue=False)
    return services.job_run(job=job)


# Slow on a CPU: MLX's quantized matmul runs a 200-token forward pass of SmolLM2 in ~30 s.
@pytest.mark.slow
def test_it_finds_an_imported_q4_1_model_identical_to_its_dequantized_gguf(
    smollm2_import: SessionImport, library_of: Any
) -> None:
    # The session's import of SmolLM2 by the `import_gguf` job (tests/conftest.py).
    library = library_of(smollm2_import)
    source, imported = smollm2_import.source, smollm2_import.job
    assert imported.state == ModelJob.State.SUCCEEDED, imported.error

    job = validate_job(library / "smollm2", n_tokens=8)

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    report = job.result
    assert job.title == "Validate smollm2"
    assert report["candidate"] == "smollm2"
    assert report["reference"] == f"{source.name} (dequantized)"
    assert report["reference_kind"] == "gguf" and report["reference_path"] == str(source)
    assert report["n_tokens"] == 8 and len(report["prompts"]) == 4
    # Q4_1 kept as it is decodes to the same numbers as the dequantized GGUF: measured 100%
    # agreement (4 of 4 answers identical) and the same perplexity to 0.1%.
    assert report["token_agreement"] >= 0.9, report["summary"]
    assert report["perplexity_ratio"] == pytest.approx(1.0, abs=0.02), report["summary"]
    assert "Paris" in report["prompts"][0]["candidate_text"]
    assert report["size_bytes"] < report["reference_size_bytes"] * 1.2
    assert report["decode_tok_s"] > 0
    assert job.done == job.total == 4
    assert "token agreement" in job.log
    entry = services.library_find(ref="smollm2")
    assert services.library_validations(entries=[entry]) == {entry.path: job}


def test_it_compares_a_conversion_with_its_safetensors_source(
    library: Path, tiny_hf_dir: Path
) -> None:
    converted = services.job_run(
        job=services.job_create(
            kind="convert",
            params={"source": str(tiny_hf_dir), "name": "tiny-f16", "dtype": "float16"},
            enqueue=False,
        )
    )
    record = json.loads((library / "tiny-f16" / services.SOURCE_RECORD).read_text())
    assert record["kind"] == "hf" and record["path"] == str(tiny_hf_dir)

    job = validate_job(library / "tiny-f16", n_tokens=8)

    assert converted.state == job.state == ModelJob.State.SUCCEEDED, job.error
    assert job.result["reference"] == "tiny-hf" and job.result["reference_kind"] == "hf"
    # float16 weights cast to float16: the same model.
    assert job.result["token_agreement"] == 1.0
    assert job.result["perplexity_ratio"] == pytest.approx(1.0)


def test_it_refuses_a_model_with_no_record_of_its_source(
    library: Path, tiny_model_dir: Path
) -> None:
    shutil.copytree(tiny_model_dir, library / "tiny")

    job = validate_job(library / "tiny")

    assert job.state == ModelJob.State.FAILED
    assert job.error == (
        "tiny has no record of what it was made from (mlxweb_source.json): only models "
        "imported, converted or quantized here can be validated."
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"kind": "gguf", "path": "{library}/gone.gguf"},
            "The GGUF it was imported from ({library}/gone.gguf) is gone.",
        ),
        (
            {"kind": "gguf", "path": "{library}/x.gguf", "uploaded_as": "x.gguf"},
            "It was imported from an upload (x.gguf) that was not kept",
        ),
        (
            {"kind": "gguf", "path": "{library}/small.gguf", "size_bytes": 1},
            "has changed since (size)",
        ),
        (
            {"kind": "hf", "path": "{library}/gone"},
            "The model it was made from ({library}/gone) is gone.",
        ),
        ({"kind": "hf", "path": "/etc"}, "The model it was made from (/etc) is gone."),
    ],
)
def test_it_refuses_when_the_source_is_gone_changed_or_outside(
    library: Path, tiny_model_dir: Path, record: dict[str, Any], message: str
) -> None:
    (library / "small.gguf").write_bytes(b"GGUF" + bytes(60))
    model = library / "tiny"
    shutil.copytree(tiny_model_dir, model)
    record = {k: v.format(library=library) if isinstance(v, str) else v for k, v in record.items()}
    (model / services.SOURCE_RECORD).write_text(json.dumps(record))

    job = validate_job(model)

    assert job.state == ModelJob.State.FAILED
    assert message.format(library=library) in job.error


def test_it_refuses_a_source_outside_the_allowed_folders(
    library: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF" + bytes(60))
    model = library / "tiny"
    shutil.copytree(tiny_model_dir, model)
    (model / services.SOURCE_RECORD).write_text(json.dumps({"kind": "gguf", "path": str(outside)}))

    job = validate_job(model)

    assert job.state == ModelJob.State.FAILED
    assert "Its source GGUF cannot be read" in job.error and "refused" in job.error
