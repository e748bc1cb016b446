"""The `quantize` job kind: an MLX model to fewer bits, as a new model."""

from __future__ import annotations

from typing import Any

from inference import services as inference_services
from models_admin.progress import JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import display_name
from models_admin.services.paths import existing_model_dir, new_model_path, weights_errors


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
    src = existing_model_dir(source)
    current = inference_services.model_dir_inspect(path=src)
    if not current["is_mlx"]:
        raise JobError(f"{src.name} is not an MLX model: convert it instead.")
    if current["quant_bits"] is not None and not recipe and bits >= current["quant_bits"]:
        raise JobError(
            f"{src.name} is already {current['quant_bits']}-bit: quantize to fewer bits."
        )
    dest = new_model_path(name)
    with weights_errors(dest):
        info = inference_services.weights_convert(
            source=src,
            dest=dest,
            progress=progress,
            quantize=True,
            bits=None if recipe else bits,
            group_size=group_size,
            recipe=recipe or None,
            dequantize_first=True,
            tag=progress.job_code or None,
            record={"job": progress.job_code},
        )
    model_id = inference_services.model_id_for_folder(name=name)
    return {"path": str(dest), "name": name, "model_id": model_id, **info}
