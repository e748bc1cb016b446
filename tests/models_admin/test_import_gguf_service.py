"""models_admin.services.model_import_gguf: a GGUF file to an MLX model, via a staging folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from models_admin import services
from models_admin.models import ModelJob
from models_admin.progress import JobProgress
from tests.support.gguf_imports import SessionImport, place

pytestmark = pytest.mark.django_db(transaction=True)

PARIS = "What is the capital of France? Answer briefly."


def import_job(source: Path | str, name: str, **options: Any) -> ModelJob:
    params = {"source": str(source), "name": name, **options}
    job = services.job_create(kind="import_gguf", params=params, enqueue=False)
    return services.job_run(job=job)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def answer(path: Path, question: str = PARIS, max_tokens: int = 16) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(path))[:2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens)


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[Any, Any]]) -> Path:
    """A small GGUF file: `tensors` maps names to (array, raw GGML type or None)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def smollm2_in_library(library: Path, smollm2_gguf: Path) -> Path:
    return place(smollm2_gguf, library / "gguf")


def test_it_imports_smollm2_into_an_mlx_model_that_says_paris(
    smollm2_import: SessionImport,
) -> None:
    # The session's import (tests/conftest.py): this job, run once, shared with the tests of
    # the import itself and of validation.
    job, library = smollm2_import.job, smollm2_import.models_dir
    smollm2_in_library = smollm2_import.source

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    out = library / "smollm2"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32  # Q4_1 / Q8_0 blocks kept as they are
    assert job.result["model_id"] == "smollm2" and job.result["architecture"] == "llama"
    assert job.result["stored"] == "kept 210 Q4_1, 1 Q8_0"
    assert job.unit == ModelJob.Unit.BYTES and job.total is not None
    assert job.done == job.total > 90_000_000
    assert "reading 272 tensors" in job.log
    assert "Paris" in answer(out)
    record = json.loads((out / services.SOURCE_RECORD).read_text())
    assert record["kind"] == "gguf" and record["path"] == str(smollm2_in_library)
    assert record["size_bytes"] == smollm2_in_library.stat().st_size
    assert record["bits"] is None and record["job"] == str(job.code)
    entry = smollm2_import.entries[str(out)]  # the row the job's closing library scan wrote
    assert entry.is_mlx and entry.loadable and entry.has_chat_template
    assert entry.model_id == "smollm2"
    assert not [p for p in library.iterdir() if p.name.startswith(".")]


def test_it_leaves_nothing_behind_when_cancelled_mid_import(
    library: Path, smollm2_in_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_done = JobProgress.set_done
    seen: list[int] = []

    def cancel_after_40_tensors(self: JobProgress, done: int) -> None:
        set_done(self, done)
        seen.append(done)
        if len(seen) == 40:
            self.cancel()  # as the monitor does when it reads the job's cancel flag

    monkeypatch.setattr(JobProgress, "set_done", cancel_after_40_tensors)

    job = import_job(smollm2_in_library, "smollm2")

    assert job.state == ModelJob.State.CANCELLED
    assert 40 <= len(seen) < 272
    assert leftovers(library) == ["gguf", f"gguf/{smollm2_in_library.name}"]
    assert "removed the unfinished output" in job.log


def _wrong_magic(folder: Path) -> Path:
    path = folder / "photo.gguf"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return path


def _truncated(folder: Path) -> Path:
    path = write_gguf(
        folder / "cut.gguf", "llama", {"x.weight": (np.ones((64, 64), np.float32), None)}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    return path


def _unsupported_type(folder: Path) -> Path:
    # Q8_K is a real GGML type (llama.cpp's activation format) that nothing dequantizes.
    weights = np.zeros((2, 292), dtype=np.uint8)
    return write_gguf(
        folder / "q8k.gguf", "llama", {"x.weight": (weights, gguf.GGMLQuantizationType.Q8_K)}
    )


def _unsupported_architecture(folder: Path) -> Path:
    return write_gguf(folder / "mamba.gguf", "mamba", {"x.weight": (np.ones(4, np.float32), None)})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_wrong_magic, "photo.gguf: not a GGUF file (wrong magic bytes)"),
        (_truncated, "cut.gguf: truncated GGUF file: tensor 'x.weight' extends past the end"),
        (_unsupported_type, "q8k.gguf: tensor 'x.weight' has type Q8_K, which cannot be read"),
        (_unsupported_architecture, "mamba.gguf: GGUF architecture 'mamba' is not supported"),
    ],
)
def test_it_fails_clearly_on_a_bad_gguf_and_leaves_nothing(
    library: Path, make: Any, message: str
) -> None:
    bad = make(library)

    job = import_job(bad, "bad")

    assert job.state == ModelJob.State.FAILED
    assert job.error.startswith(message), job.error
    assert leftovers(library) == [bad.name]


def test_it_refuses_a_path_outside_the_allowed_folders(library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    source = _wrong_magic(outside)

    job = import_job(source, "stolen")

    assert job.state == ModelJob.State.FAILED
    assert "outside the folders GGUF files may be imported from" in job.error
    assert "refused" in job.error and "library.import_dirs" in job.error
    assert leftovers(library) == []


def test_it_refuses_a_link_that_leads_outside(library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (library / "sneaky.gguf").symlink_to(_wrong_magic(outside))

    job = import_job(library / "sneaky.gguf", "stolen")

    assert job.state == ModelJob.State.FAILED
    assert "refused" in job.error


def test_it_reads_from_the_configured_import_folders(
    library: Path, tmp_path: Path, settings: Any
) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    settings.MLXWEB_IMPORT_DIRS = [imports]

    job = import_job(_wrong_magic(imports), "photo")

    assert job.state == ModelJob.State.FAILED
    assert job.error == "photo.gguf: not a GGUF file (wrong magic bytes)"  # read, not refused


def test_it_removes_an_upload_when_its_import_ends(library: Path) -> None:
    uploads = services.upload_dir()
    uploads.mkdir()
    upload = _wrong_magic(uploads)

    job = import_job(upload, "photo", uploaded_as="holiday.gguf")

    assert job.state == ModelJob.State.FAILED
    assert job.title == "Import holiday.gguf as photo"
    assert not upload.exists()
    retry = services.job_run(job=services.job_retry(job=job, enqueue=False))
    assert retry.error == (
        "The uploaded file holiday.gguf is gone (an upload is removed when its import ends): "
        "upload it again."
    )


def test_it_will_not_overwrite_an_existing_model(library: Path) -> None:
    (library / "taken").mkdir()
    source = _wrong_magic(library)

    job = import_job(source, "taken")

    assert job.state == ModelJob.State.FAILED
    assert job.error == "A model named 'taken' already exists in the models folder."


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_it_imports_gemma3_requantized_to_4_bits_and_validates_it(
    gemma3_import: SessionImport, library_of: Any
) -> None:
    # The session's import (tests/conftest.py), whose folder the evaluation tests measure too.
    job = gemma3_import.job
    assert job.params == {
        "source": str(gemma3_import.source),
        "name": "gemma3-4bit",
        "bits": 4,
        "group_size": 64,
    }

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert job.result["architecture"] == "gemma3" and job.result["bits"] == 4
    assert "re-quantized" in job.result["stored"] and "Q4_K" in job.result["stored"]
    library = library_of(gemma3_import)
    config = json.loads((library / "gemma3-4bit" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64

    validation = services.job_run(
        job=services.job_create(
            kind="validate", params={"source": job.result["path"], "n_tokens": 8}, enqueue=False
        )
    )

    assert validation.state == ModelJob.State.SUCCEEDED, validation.error
    report = validation.result
    assert report["reference"] == "gemma-3-270m-q4_k_m.gguf (dequantized)"
    # Measured: half the tokens agree (2 of 4 answers identical over 8 tokens; Gemma 3 270M is a
    # base model asked chat questions, so its answers wander), perplexity +30% (a 270M model's
    # Q4_K_M weights dequantized and re-quantized to 4 bits).
    assert report["token_agreement"] >= 0.25, report["summary"]
    assert 1.0 < report["perplexity_ratio"] < 1.5, report["summary"]
    assert report["size_bytes"] and report["reference_size_bytes"]
