"""The `import_gguf` job kind: a GGUF file (from an import folder or an upload) to MLX."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.template.defaultfilters import filesizeformat

from inference.catalogue import model_id_for_dir
from models_admin.models import ModelJob
from models_admin.progress import JobCancelled, JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import source_record, write_source_record
from models_admin.services.paths import (
    LibraryError,
    library_check_import_path,
    new_model_path,
    publish,
    staging_folder,
)
from models_admin.services.uploads import upload_remove


def _describe_import(params: dict[str, Any]) -> str:
    file_name = params.get("uploaded_as") or Path(params["source"]).name
    bits = params.get("bits")
    how = f" at {bits}-bit" if bits else ""
    return f"Import {file_name} as {params['name']}{how}"


def _import_progress(progress: JobProgress, ends: list[int]) -> Callable[[str, int, int], None]:
    """inference.gguf's progress(step, done, total) as the job's: bytes of tensors read (`ends`:
    where each tensor's bytes end, counted from the first), then the save."""

    def report(step: str, done: int, total: int) -> None:
        if step == "tensors":
            if done:
                progress.set_done(ends[min(done, len(ends)) - 1])
            else:
                progress.log(f"reading {total} tensors")
            progress.set_step_text(f"reading tensors ({done} of {total})")
        elif step == "save" and done == 0:
            progress.set_done(ends[-1] if ends else 0)
            progress.set_step_text("building and saving the MLX model")
            progress.log("building and saving the MLX model")

    return report


@job_kind("import_gguf", heavy=True, describe=_describe_import)
def model_import_gguf(
    *,
    source: str,
    name: str,
    progress: JobProgress,
    bits: int | None = None,
    group_size: int = 64,
    uploaded_as: str | None = None,
) -> dict[str, Any]:
    """Import a GGUF file as an MLX model `name`.

    Q4_0 / Q4_1 / Q8_0 tensors are kept as they are; the other types are dequantized, then
    re-quantized to `bits` (affine, `group_size`) or, without `bits`, stored as floats. The
    tokenizer and chat template come from the file. `uploaded_as` marks an upload: the file is
    removed when the job ends, whatever the outcome (a retry then asks for a new upload).
    """
    from inference import gguf
    from models_admin import conversion

    try:
        path = library_check_import_path(path=source)
    except LibraryError as e:
        if uploaded_as is not None and not Path(source).exists():
            raise JobError(
                f"The uploaded file {uploaded_as} is gone (an upload is removed when its import "
                "ends): upload it again."
            ) from e
        raise JobError(str(e)) from e
    try:
        if bits is not None and bits not in gguf.REQUANT_BITS:
            raise JobError(f"bits must be one of {', '.join(map(str, gguf.REQUANT_BITS))}.")
        if group_size not in gguf.REQUANT_GROUP_SIZES:
            raise JobError(
                f"group_size must be one of {', '.join(map(str, gguf.REQUANT_GROUP_SIZES))}."
            )
        dest = new_model_path(name)
        progress.start_step(f"reading the header of {uploaded_as or path.name}")
        try:
            header = gguf.read_header(path)
        except gguf.GGUFError as e:
            raise JobError(str(e)) from e
        ends = list(itertools.accumulate(t.nbytes for t in header.tensors))
        architecture = header.metadata.get("general.architecture", "?")
        progress.log(
            f"{architecture}, {len(header.tensors)} tensors, {filesizeformat(path.stat().st_size)}"
        )
        progress.start_step(
            "reading the tokenizer", total=ends[-1] if ends else 0, unit=ModelJob.Unit.BYTES
        )
        with staging_folder(progress) as staging:
            try:
                result = gguf.import_gguf(
                    path,
                    staging / "model",
                    bits=bits,
                    group_size=group_size,
                    progress=_import_progress(progress, ends),
                    should_cancel=lambda: progress.cancelled,
                )
            except gguf.ConversionCancelled as e:
                raise JobCancelled() from e
            except gguf.GGUFError as e:
                raise JobError(str(e)) from e
            finally:
                conversion.release_memory()
            record = source_record(
                "gguf",
                path,
                progress,
                bits=bits,
                group_size=group_size if bits else None,
                uploaded_as=uploaded_as,
            )
            write_source_record(staging / "model", record)
            progress.check_cancelled()
            progress.set_step_text(f"moving into place as {name}")
            publish(staging / "model", dest)
            staging.rmdir()
    finally:
        if uploaded_as is not None:
            upload_remove(path)
    quantization = result.quantization
    progress.log(f"stored: {_describe_quantization(quantization)}")
    return {
        "path": str(dest),
        "name": name,
        "model_id": model_id_for_dir(name),
        "source": str(path) if uploaded_as is None else uploaded_as,
        "architecture": result.architecture,
        "model_type": result.model_type,
        "parameters": result.parameters,
        "bits": bits,
        "group_size": group_size if bits else None,
        "stored": _describe_quantization(quantization),
        "size_bytes": result.size_bytes,
        "source_size_bytes": result.source_size_bytes,
        "seconds": round(result.seconds, 2),
    }


def _describe_quantization(summary: dict[str, Any]) -> str:
    """inference.gguf's summary of what became of each tensor, in a line for people."""
    parts = []
    kept = summary.get("kept") or {}
    if kept:
        parts.append("kept " + ", ".join(f"{n} {t}" for t, n in sorted(kept.items())))
    requantized = summary.get("requantized") or {}
    if requantized.get("tensors"):
        sources = ", ".join(f"{n} {t}" for t, n in sorted((requantized.get("from") or {}).items()))
        parts.append(
            f"re-quantized {requantized['tensors']} to {requantized.get('bits')}-bit "
            f"(group {requantized.get('group_size')}; from {sources})"
        )
    if summary.get("float"):
        parts.append(f"{summary['float']} as {summary.get('dtype') or 'float'}")
    return "; ".join(parts) or "nothing"
