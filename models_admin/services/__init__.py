"""The model library: what other code may ask of models_admin.

Paths (`paths`): `library_roots`, `library_check_path`, `import_roots`,
`library_check_import_path`, `has_gguf_magic`, `default_model_name`.
Library (`library`): `library_scan`, `library_find`, `library_delete_preview`,
`library_source_record`, `library_validations`.
Jobs (`jobs`): `job_create`, `job_cancel`, `job_retry`, `job_run`, `job_reap_dead`,
`job_cleanup_staging`, and the registry of job kinds (`job_kind`, `get_job_kind`).
Uploads (`uploads`): `upload_dir`, `upload_accept`.
Memory (`memory`): `memory_overview`, what the live inference workers hold in memory and the jobs
holding or waiting for a share of the memory budget; `adapter_list`, the LoRA adapters.
Job kinds, one module each under `kinds/`, each one registered service function: `model_pull`,
`model_convert`, `model_quantize`, `model_import_gguf`, `model_validate`, `model_delete`,
`model_export_gguf` (with `gguf_export_path`, where an export may go).
"""

from __future__ import annotations

from models_admin.services.jobs import (
    JobKind,
    JobStateError,
    UnknownJobKind,
    get_job_kind,
    job_cancel,
    job_cleanup_staging,
    job_create,
    job_kind,
    job_kinds,
    job_reap_dead,
    job_retry,
    job_run,
)
from models_admin.services.kinds.convert import model_convert
from models_admin.services.kinds.delete import model_delete
from models_admin.services.kinds.export_gguf import (
    EXPORTABLE_MODEL_TYPES,
    gguf_export_default_name,
    gguf_export_path,
    model_export_gguf,
)
from models_admin.services.kinds.import_gguf import model_import_gguf
from models_admin.services.kinds.pull import model_pull
from models_admin.services.kinds.quantize import model_quantize
from models_admin.services.kinds.validate import model_validate
from models_admin.services.library import (
    SOURCE_RECORD,
    DeletePreview,
    library_delete_preview,
    library_find,
    library_scan,
    library_source_record,
    library_validations,
)
from models_admin.services.memory import adapter_list, memory_overview
from models_admin.services.paths import (
    GGUF_MAGIC,
    NAME_PATTERN,
    LibraryError,
    PathRefused,
    default_model_name,
    has_gguf_magic,
    import_roots,
    library_check_import_path,
    library_check_path,
    library_roots,
)
from models_admin.services.uploads import upload_accept, upload_dir

__all__ = [
    "EXPORTABLE_MODEL_TYPES",
    "GGUF_MAGIC",
    "NAME_PATTERN",
    "SOURCE_RECORD",
    "DeletePreview",
    "JobKind",
    "JobStateError",
    "LibraryError",
    "PathRefused",
    "UnknownJobKind",
    "default_model_name",
    "get_job_kind",
    "gguf_export_default_name",
    "gguf_export_path",
    "has_gguf_magic",
    "import_roots",
    "job_cancel",
    "job_cleanup_staging",
    "job_create",
    "job_kind",
    "job_kinds",
    "job_reap_dead",
    "job_retry",
    "job_run",
    "library_check_import_path",
    "library_check_path",
    "library_delete_preview",
    "library_find",
    "library_roots",
    "library_scan",
    "library_source_record",
    "library_validations",
    "adapter_list",
    "memory_overview",
    "model_convert",
    "model_delete",
    "model_export_gguf",
    "model_import_gguf",
    "model_pull",
    "model_quantize",
    "model_validate",
    "upload_accept",
    "upload_dir",
]
