"""The `export_gguf` job kind: a library model folder to a GGUF file in the models folder.

The file goes where the library lists GGUF files (the models folder, or one of its plain
folders), so it shows in the library when the job ends. It is written as
`.staging-<job code>` in the models folder and renamed into place at the end: a job that dies
leaves only that, which `job_cleanup_staging` removes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings

from inference import services as inference_services
from inference.services import GGUF_EXPORT_TYPES
from models_admin.progress import JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.library import display_name
from models_admin.services.paths import (
    NAME_RE,
    PathRefused,
    default_model_name,
    existing_model_dir,
    weights_errors,
)

# The mlx-lm model types the export knows (llama, Mistral, SmolLM2, Gemma 3).
EXPORTABLE_MODEL_TYPES = frozenset({"llama", "mistral", "gemma3_text", "gemma3"})


def gguf_export_default_name(source_name: str, file_type: str) -> str:
    """The file name an export gets when none is asked for: `<model>-<TYPE>.gguf`."""
    return default_model_name(source_name, file_type.upper())[:95] + ".gguf"


def gguf_export_path(path: str | Path) -> Path:
    """Where an export asked for as `path` goes; PathRefused saying why if it may not.

    `path` is a file name in the models folder, or a path inside it: the models folder itself
    or one of its plain folders (not a model folder, not hidden), since those are where the
    library finds GGUF files. The name ends in `.gguf` and the file must not exist.
    """
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    raw = Path(str(path).strip()).expanduser()
    candidate = raw if raw.is_absolute() else models_dir / raw
    candidate = Path(os.path.abspath(candidate))
    real_root = Path(os.path.realpath(models_dir))
    real = Path(os.path.realpath(candidate))
    relative = real.relative_to(real_root) if real_root in real.parents else None
    if relative is None or len(relative.parts) > 2:
        raise PathRefused(
            f"{path}: an export goes into the models folder ({models_dir}) or one of its "
            "folders, where the library lists GGUF files."
        )
    if any(not NAME_RE.match(part) for part in relative.parts):
        raise PathRefused(
            f"{path}: use letters, digits, '.', '_' and '-' in names, starting with a letter "
            "or digit."
        )
    if relative.suffix != ".gguf":
        raise PathRefused(f"{path}: the file name must end in .gguf.")
    if len(relative.parts) == 2 and (real.parent / "config.json").exists():
        raise PathRefused(
            f"{path}: {relative.parts[0]} is a model folder; put the GGUF file beside it."
        )
    if real.exists() or candidate.is_symlink():
        raise PathRefused(f"{path}: a file of that name already exists.")
    return candidate


def _describe(params: dict[str, Any]) -> str:
    return (
        f"Export {display_name(params['source'])} to GGUF as {Path(params['path']).name} "
        f"({params.get('file_type', 'q8_0').upper()})"
    )


@job_kind("export_gguf", heavy=True, describe=_describe)
def model_export_gguf(
    *, source: str, path: str, progress: JobProgress, file_type: str = "q8_0"
) -> dict[str, Any]:
    """Export the model folder `source` as the GGUF file `path` (see `gguf_export_path`), its
    weights as `file_type` (f16, q8_0 or q4_0), with its tokenizer and chat template."""
    src = existing_model_dir(source)
    if file_type not in GGUF_EXPORT_TYPES:
        raise JobError(f"file_type must be one of {', '.join(GGUF_EXPORT_TYPES)}.")
    try:
        dest = gguf_export_path(path)
    except PathRefused as e:
        raise JobError(str(e)) from e
    work = Path(settings.MLXWEB_MODELS_DIR) / f".staging-{progress.job_code or uuid.uuid4()}"
    with weights_errors(dest):
        result = inference_services.weights_export_gguf(
            source=src, dest=dest, file_type=file_type, progress=progress, work_path=work
        )
    types = ", ".join(f"{n} {t}" for t, n in result.tensor_types.items())
    progress.log(f"wrote {result.tensors} tensors ({types})")
    return {
        "path": str(dest),
        "name": dest.name,
        "source": str(src),
        "file_type": file_type,
        "architecture": result.architecture,
        "parameters": result.parameters,
        "tensor_types": result.tensor_types,
        "size_bytes": result.size_bytes,
        "seconds": round(result.seconds, 2),
    }
