"""The `import_gguf` job kind: a GGUF file (from an import folder or an upload) to MLX."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from django.template.defaultfilters import filesizeformat

from inference import services as inference_services
from inference.services import QUANT_BITS, QUANT_GROUP_SIZES
from models_admin.models import ModelJob
from models_admin.progress import JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.paths import (
    LibraryError,
    library_check_import_path,
    new_model_path,
    weights_errors,
)
from models_admin.services.uploads import upload_remove


def _describe_import(params: dict[str, Any]) -> str:
    file_name = params.get("uploaded_as") or Path(params["source"]).name
    bits = params.get("bits")
    how = f" at {bits}-bit" if bits else ""
    return f"Import {file_name} as {params['name']}{how}"


class _ImportProgress:
    """The import's progress (a "tensors" step counting tensors, then "save") as the job's:
    bytes of tensors read (`ends`: where each tensor's bytes end, counted from the first), then
    the save. A `Progress`, like the job's own."""

    def __init__(self, progress: JobProgress, ends: list[int]) -> None:
        self.job = progress
        self.ends = ends
        self.current = ""
        self.done = 0
        self.total = 0

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        self.current, self.done, self.total = text, done, total or 0
        if text == "tensors":
            self.job.log(f"reading {self.total} tensors")
            self.job.set_step_text(f"reading tensors ({done} of {self.total})")
        elif text == "save":
            self.job.set_done(self.ends[-1] if self.ends else 0)
            self.job.set_step_text("building and saving the MLX model")
            self.job.log("building and saving the MLX model")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.current == "tensors" and self.done:
            self.job.set_done(self.ends[min(self.done, len(self.ends)) - 1])
            self.job.set_step_text(f"reading tensors ({self.done} of {self.total})")

    def log(self, line: str) -> None:
        self.job.log(line)

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled


# K-quant tensors are dequantized to floats before they are stored or re-quantized.
@job_kind("import_gguf", heavy=True, describe=_describe_import, memory_factor=3.0)
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
        if bits is not None and bits not in QUANT_BITS:
            raise JobError(f"bits must be one of {', '.join(map(str, QUANT_BITS))}.")
        if group_size not in QUANT_GROUP_SIZES:
            raise JobError(f"group_size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}.")
        dest = new_model_path(name)
        progress.step(f"reading the header of {uploaded_as or path.name}")
        with weights_errors(dest):
            header = inference_services.gguf_read_header(path=path)
        ends = list(itertools.accumulate(t.nbytes for t in header.tensors))
        architecture = header.metadata.get("general.architecture", "?")
        progress.log(
            f"{architecture}, {len(header.tensors)} tensors, {filesizeformat(path.stat().st_size)}"
        )
        progress.step(
            "reading the tokenizer", total=ends[-1] if ends else 0, unit=ModelJob.Unit.BYTES
        )
        with weights_errors(dest):
            result = inference_services.gguf_import(
                path=path,
                dest=dest,
                bits=bits,
                group_size=group_size,
                progress=_ImportProgress(progress, ends),
                tag=progress.job_code or None,
                record={
                    "job": progress.job_code,
                    "bits": bits,
                    "group_size": group_size if bits else None,
                    "uploaded_as": uploaded_as,
                },
            )
    finally:
        if uploaded_as is not None:
            upload_remove(path)
    quantization = result.quantization
    progress.log(f"stored: {_describe_quantization(quantization)}")
    return {
        "path": str(dest),
        "name": name,
        "model_id": inference_services.model_id_for_folder(name=name),
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
    """The import's summary of what became of each tensor, in a line for people."""
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
