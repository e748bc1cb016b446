"""GGUF files: the reader (`reader`), tensor decoding (`tensors`), per-architecture configs and
tensor names (`architectures`) and the tokenizer (`tokenizer`). Importing it never imports mlx.
"""

from inference.weights.gguf.architectures import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture
from inference.weights.gguf.reader import (
    GGUF_MAGIC,
    GGUFError,
    GGUFHeader,
    GGUFSummary,
    NotGGUFFile,
    TensorInfo,
    TruncatedGGUF,
    UnsupportedTensorType,
    read_header,
    read_summary,
)

__all__ = [
    "GGUF_MAGIC",
    "SUPPORTED_ARCHITECTURES",
    "GGUFError",
    "GGUFHeader",
    "GGUFSummary",
    "NotGGUFFile",
    "TensorInfo",
    "TruncatedGGUF",
    "UnsupportedArchitecture",
    "UnsupportedTensorType",
    "read_header",
    "read_summary",
]
