"""The `convert` job kind: a Hugging Face safetensors model to MLX, optionally quantized."""

from __future__ import annotations

from typing import Any

from inference import services as inference_services
from models_admin.progress import JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import display_name
from models_admin.services.paths import existing_model_dir, new_model_path, weights_errors


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
    src = existing_model_dir(source)
    dest = new_model_path(name)
    with weights_errors(dest):
        info = inference_services.weights_convert(
            source=src,
            dest=dest,
            progress=progress,
            dtype=dtype or None,
            quantize=quantize,
            bits=bits if quantize and not recipe else None,
            group_size=group_size if quantize else None,
            recipe=recipe or None,
            tag=progress.job_code or None,
            record={"job": progress.job_code},
        )
    model_id = inference_services.model_id_for_folder(name=name)
    return {"path": str(dest), "name": name, "model_id": model_id, **info}
