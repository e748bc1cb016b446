"""The `convert` job kind: a Hugging Face safetensors model to MLX, optionally quantized."""

from __future__ import annotations

from typing import Any

from inference.catalogue import model_id_for_dir
from models_admin.progress import JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import display_name, source_record, write_source_record
from models_admin.services.paths import (
    existing_model_dir,
    new_model_path,
    publish,
    staging_folder,
)


@job_kind(
    "convert",
    heavy=True,
    describe=lambda p: f"Convert {display_name(p['source'])} to {p['name']}",
)
def model_convert(
    *,
    source: str,
    name: str,
    progress: JobProgress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
) -> dict[str, Any]:
    """Convert a Hugging Face safetensors model to MLX (optionally quantized) as `name`."""
    from models_admin import conversion

    src = existing_model_dir(source)
    dest = new_model_path(name)
    with staging_folder(progress) as staging:
        info = conversion.convert(
            source=src,
            dest=staging,
            progress=progress,
            dtype=dtype or None,
            quantize=quantize,
            bits=bits if quantize and not recipe else None,
            group_size=group_size if quantize else None,
            recipe=recipe or None,
        )
        write_source_record(staging, source_record("hf", src, progress))
        progress.check_cancelled()
        progress.set_step_text(f"moving into place as {name}")
        publish(staging, dest)
    return {"path": str(dest), "name": name, "model_id": model_id_for_dir(name), **info}
