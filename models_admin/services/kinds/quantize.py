"""The `quantize` job kind: an MLX model to fewer bits, as a new model."""

from __future__ import annotations

from typing import Any

from inference.catalogue import model_id_for_dir
from models_admin import library
from models_admin.progress import JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import display_name, source_record, write_source_record
from models_admin.services.paths import (
    existing_model_dir,
    new_model_path,
    publish,
    staging_folder,
)


@job_kind(
    "quantize",
    heavy=True,
    describe=lambda p: (
        f"Quantize {display_name(p['source'])} to {p.get('recipe') or str(p['bits']) + '-bit'}"
    ),
)
def model_quantize(
    *,
    source: str,
    name: str,
    bits: int,
    progress: JobProgress,
    group_size: int = 64,
    recipe: str | None = None,
) -> dict[str, Any]:
    """Quantize an MLX model to fewer bits, as a new model `name` (the source is kept)."""
    from models_admin import conversion

    src = existing_model_dir(source)
    current = library.inspect_hf_dir(src)
    if not current["is_mlx"]:
        raise JobError(f"{src.name} is not an MLX model: convert it instead.")
    if current["quant_bits"] is not None and not recipe and bits >= current["quant_bits"]:
        raise JobError(
            f"{src.name} is already {current['quant_bits']}-bit: quantize to fewer bits."
        )
    dest = new_model_path(name)
    with staging_folder(progress) as staging:
        info = conversion.convert(
            source=src,
            dest=staging,
            progress=progress,
            quantize=True,
            bits=None if recipe else bits,
            group_size=group_size,
            recipe=recipe or None,
            dequantize_first=True,
        )
        write_source_record(staging, source_record("mlx", src, progress))
        progress.check_cancelled()
        progress.set_step_text(f"moving into place as {name}")
        publish(staging, dest)
    return {"path": str(dest), "name": name, "model_id": model_id_for_dir(name), **info}
