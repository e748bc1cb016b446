"""The `validate` job kind: a model made here compared with the source it was made from."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inference import services as inference_services
from models_admin.progress import JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import SOURCE_RECORD, display_name, library_source_record
from models_admin.services.paths import (
    LibraryError,
    PathRefused,
    existing_model_dir,
    library_check_import_path,
    library_check_path,
)

logger = logging.getLogger(__name__)


def _reference_for(record: dict[str, Any], progress: JobProgress) -> tuple[str, Path]:
    """The reference a model's source record names, checked: its kind ("gguf" or "dir") and
    path. Raises JobError when it is gone, changed or no longer in an allowed folder."""
    path = Path(record["path"])
    if record["kind"] == "gguf":
        if record.get("uploaded_as"):
            raise JobError(
                f"It was imported from an upload ({record['uploaded_as']}) that was not kept: "
                "there is no GGUF to compare it with. Import it again from a kept file."
            )
        if not path.is_file():
            raise JobError(f"The GGUF it was imported from ({path}) is gone.")
        try:
            library_check_import_path(path=path)
        except LibraryError as e:
            raise JobError(f"Its source GGUF cannot be read: {e}") from e
        stat = path.stat()
        if record.get("size_bytes") not in (None, stat.st_size):
            raise JobError(f"The GGUF it was imported from ({path}) has changed since (size).")
        if record.get("mtime_ns") not in (None, stat.st_mtime_ns):
            progress.log(f"note: {path.name} was modified after the import (same size)")
        return "gguf", path
    if not (path / "config.json").is_file():
        raise JobError(f"The model it was made from ({path}) is gone.")
    try:
        library_check_path(path=path)
    except PathRefused as e:
        raise JobError(f"Its source cannot be read: {e}") from e
    return "dir", path


def _describe_run(run: Any) -> str:
    speed = f"{run.decode_tok_s:.1f} tok/s" if run.decode_tok_s else "no decode speed"
    return f"{run.label}: perplexity {run.perplexity:.2f}, {speed}, measured in {run.seconds:.0f} s"


# Two models in memory (the one made here and its source), computed in float32 on the CPU.
@job_kind(
    "validate",
    heavy=True,
    describe=lambda p: f"Validate {display_name(p['source'])}",
    memory_factor=4.0,
)
def model_validate(*, source: str, progress: JobProgress, n_tokens: int = 32) -> dict[str, Any]:
    """Compare a model made here with the source it was made from: the same prompts answered
    greedily (share of identical tokens over the first `n_tokens`), a short text's perplexity
    from both, size and decode speed (inference.weights.evaluation). The two models are loaded
    one after the other, so memory holds one at a time."""

    src = existing_model_dir(source)
    record = library_source_record(path=src)
    if record is None:
        raise JobError(
            f"{src.name} has no record of what it was made from ({SOURCE_RECORD}): only models "
            "imported, converted or quantized here can be validated."
        )
    if not 1 <= n_tokens <= 1024:
        raise JobError("n_tokens must be between 1 and 1024.")
    kind, ref_path = _reference_for(record, progress)
    reference_label = f"{ref_path.name} (dequantized)" if kind == "gguf" else ref_path.name
    progress.step(f"loading the reference, {reference_label}", total=4)
    try:
        try:
            reference = inference_services.validation_reference(kind=kind, path=ref_path)
        except inference_services.GGUFError as e:
            raise JobError(str(e)) from e
        progress.advance()
        progress.check_cancelled()
        prompts = list(inference_services.VALIDATION_PROMPTS)
        progress.set_step_text(
            f"running the reference: {len(prompts)} prompts x {n_tokens} tokens, perplexity"
        )
        reference_run = inference_services.validation_measure(
            model=reference,
            label=reference_label,
            prompts=prompts,
            n_tokens=n_tokens,
            path=ref_path,
        )
        progress.log(_describe_run(reference_run))
        del reference
        inference_services.weights_release_memory()
        progress.advance()
        progress.check_cancelled()

        progress.log(f"loading {src.name}")
        progress.set_step_text(f"loading {src.name}")
        candidate = inference_services.validation_reference(kind="dir", path=src)
        progress.advance()
        progress.check_cancelled()
        progress.set_step_text(f"running {src.name}")
        candidate_run = inference_services.validation_measure(
            model=candidate, label=src.name, prompts=prompts, n_tokens=n_tokens, path=src
        )
        progress.log(_describe_run(candidate_run))
        del candidate
        progress.advance()
    finally:
        inference_services.weights_release_memory()
    report = inference_services.validation_compare(candidate=candidate_run, reference=reference_run)
    progress.log(report.summary())
    logger.info("job %s: %s", progress.job_code or "-", report.summary())
    return {
        **report.to_dict(),
        "summary": report.summary(),
        "path": str(src),
        "reference_kind": record["kind"],
        "reference_path": str(ref_path),
    }
