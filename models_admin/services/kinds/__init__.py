"""One module per job kind; importing this package registers them all (see `services.jobs`)."""

from __future__ import annotations

from models_admin.services.kinds import (
    convert,
    delete,
    export_gguf,
    import_gguf,
    pull,
    quantize,
    validate,
)

__all__ = ["convert", "delete", "export_gguf", "import_gguf", "pull", "quantize", "validate"]
