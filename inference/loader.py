"""Turn a catalogue `ModelSpec` into a model and tokenizer in memory.

Only paths a `ModelSpec` names are read, and nothing is ever downloaded: hub models must already
be in the local Hugging Face cache. A GGUF file is converted once into an mlx-lm directory under
`converted_dir`, keyed by the file's path, size and modification time, so later starts load
that directory directly.

A LoRA adapter (a catalogue entry with `adapter_path`) loads as mlx-lm's `load(...,
adapter_path=...)` does it: its base model, then the adapter's LoRA layers on top, checked
against the base (an adapter trained for another model is a clear error, not a crash).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from inference.catalogue import ADAPTER_WEIGHTS, ModelSpec
from inference.memory import weights_bytes_on_disk

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from inference.embeddings import SentenceEmbedder

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model's weights are missing or unreadable; the message says which and why."""


@dataclass
class LoadedModel:
    """A model ready to generate, with what the engine needs to know about it."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    context_length: int
    spec: ModelSpec


def converted_path(spec: ModelSpec, converted_dir: Path) -> Path:
    """Where the mlx-lm form of a GGUF model is cached; a changed file gets a new directory."""
    assert spec.path is not None
    stat = spec.path.stat()
    key = f"{spec.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(converted_dir) / f"{_conversion_name(spec)}-{digest}"


def _conversion_name(spec: ModelSpec) -> str:
    # An adapter on a GGUF base shares its base's conversion.
    return spec.base_id if spec.adapter_path is not None and spec.base_id else spec.id


def weights_bytes(spec: ModelSpec, converted_dir: Path) -> int:
    """What the model's weights take on disk, as it will load (a GGUF's converted folder once it
    exists, plus an adapter's weights): the memory budget's estimate before loading."""
    source = spec.local_path()
    if source is None:
        return 0
    size = weights_bytes_on_disk(source)
    if spec.kind == "gguf":
        target = converted_path(spec, Path(converted_dir))
        if (target / "config.json").is_file():
            size = weights_bytes_on_disk(target)
    if spec.adapter_path is not None:
        size += weights_bytes_on_disk(spec.adapter_path / ADAPTER_WEIGHTS)
    return size


def load_model(spec: ModelSpec, converted_dir: Path) -> LoadedModel:
    """Load the model a spec names. Raises `ModelLoadError` with a clear message."""
    started = time.perf_counter()
    source = spec.local_path()
    if source is None:
        raise ModelLoadError(_missing_message(spec))
    if spec.kind == "gguf":
        model_dir = _converted_dir_for(spec, source, Path(converted_dir))
    else:
        model_dir = source
    model, tokenizer, config = _load_mlx_dir(spec, model_dir)
    if spec.adapter_path is not None:
        _apply_adapter(spec, model)
    if spec.chat_template:
        _override_chat_template(tokenizer, spec.chat_template)
    context = _context_length(spec, config)
    logger.info(
        "loaded model %s (%s) from %s in %.1fs",
        spec.id,
        spec.kind,
        model_dir,
        time.perf_counter() - started,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, context_length=context, spec=spec)


def load_embedder(spec: ModelSpec) -> SentenceEmbedder:
    """Load the embedding model a spec names (a sentence-transformers folder), its length
    limit capped by the spec's context length. Raises `ModelLoadError` with a clear message."""
    from inference.embeddings import load_sentence_embedder
    from inference.weights.sentence import SentenceModelError

    started = time.perf_counter()
    if spec.task != "embed":
        raise ModelLoadError(f"model {spec.id!r} is not an embedding model")
    source = spec.local_path()
    if source is None:
        raise ModelLoadError(_missing_message(spec))
    try:
        embedder = load_sentence_embedder(source, max_length=spec.context_length)
    except (SentenceModelError, OSError, ValueError) as e:
        raise ModelLoadError(f"model {spec.id!r}: cannot load {source}: {e}") from e
    logger.info(
        "loaded embedding model %s from %s in %.1fs (max %d tokens, %s pooling)",
        spec.id,
        source,
        time.perf_counter() - started,
        embedder.max_length,
        embedder.pipeline.pooling,
    )
    return embedder


def float32_bytes(model: nn.Module) -> int:
    """How many bytes the model's weights take once dequantized and cast to float32."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from inference.weights.convert import parameters

    elements = sum(value.size for _, value in parameters(model))
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding | QuantizedSwitchLinear):
            biases = module.get("biases")
            elements -= module.scales.size + (biases.size if biases is not None else 0)
            elements += module.weight.size * 32 // module.bits - module.weight.size
    return elements * 4


def use_float32_on_cpu(loaded: LoadedModel, max_bytes: int) -> bool:
    """Serve the model in float32 if MLX runs on the CPU and its float32 weights fit `max_bytes`
    (see `float32_on_cpu`). Returns whether the model was changed."""
    return float32_on_cpu(loaded.model, max_bytes, label=loaded.spec.id)


def float32_on_cpu(model: nn.Module, max_bytes: int, *, label: str) -> bool:
    """Dequantize and cast `model` to float32 if MLX runs on the CPU and it fits `max_bytes`.

    On x86 MLX's quantized matmul is a scalar single-threaded loop and float16/bfloat16 are
    emulated, while float32 matmuls go through BLAS (OpenBLAS, which the launcher preloads):
    SmolLM2-135M decodes about twice and prefills about thirteen times as fast (see
    ENGINE_FACTS). Dequantizing computes the same function (the same weights, read out once), so
    serving and validation may both use it. The files on disk stay as they are. Returns whether
    the model was changed.
    """
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    from inference.weights.convert import parameters

    if mx.default_device() != mx.cpu or max_bytes <= 0:
        return False
    params = parameters(model)
    quantized = any(name.endswith(".scales") for name, _ in params)
    narrow = any(v.dtype in (mx.float16, mx.bfloat16) for _, v in params)
    if not (quantized or narrow):
        return False
    size = float32_bytes(model)
    if size > max_bytes:
        logger.info(
            "model %s stays as it is: float32 would take %.2f GB (cpu_float32_max_bytes %.2f GB)",
            label,
            size / 1e9,
            max_bytes / 1e9,
        )
        return False
    dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    logger.info("model %s runs in float32 on the CPU (%.2f GB)", label, size / 1e9)
    return True


def _missing_message(spec: ModelSpec) -> str:
    if spec.problem is not None:
        return spec.problem
    if spec.adapter_path is not None and spec.base_id is not None:
        base = ModelSpec(**{**spec.__dict__, "adapter_path": None, "id": spec.base_id})
        if base.local_path() is not None:
            return f"adapter {spec.id!r}: adapter files missing in {spec.adapter_path}"
        return f"adapter {spec.id!r}: base " + _missing_message(base)
    if spec.kind == "hub":
        rev = f" at revision {spec.revision}" if spec.revision else ""
        return (
            f"model {spec.id!r}: {spec.hub_repo}{rev} is not in the local Hugging Face cache "
            "(download it first)"
        )
    what = "GGUF file" if spec.kind == "gguf" else "model directory (with config.json)"
    return f"model {spec.id!r}: {what} not found at {spec.path}"


def _converted_dir_for(spec: ModelSpec, gguf_path: Path, converted_dir: Path) -> Path:
    from inference.weights.convert import import_gguf
    from inference.weights.gguf import GGUFError

    target = converted_path(spec, converted_dir)
    if (target / "config.json").is_file():
        return target
    started = time.perf_counter()
    try:
        # The same conversion as the library's GGUF import: blocks MLX reads kept, the rest
        # as floats.
        import_gguf(gguf_path, target, overwrite=True)
    except GGUFError as e:
        raise ModelLoadError(f"model {spec.id!r}: cannot convert {gguf_path.name}: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"model {spec.id!r}: cannot write {target}: {e}") from e
    logger.info(
        "converted %s to %s in %.1fs", gguf_path.name, target, time.perf_counter() - started
    )
    _remove_stale_conversions(spec, target)
    return target


def _remove_stale_conversions(spec: ModelSpec, keep: Path) -> None:
    """Delete conversions of earlier versions of this spec's file: they will never load again."""
    stale = re.compile(rf"^{re.escape(_conversion_name(spec))}-[0-9a-f]{{12}}$")
    for child in keep.parent.iterdir():
        if child != keep and child.is_dir() and stale.match(child.name):
            logger.info("removing stale conversion %s", child)
            shutil.rmtree(child, ignore_errors=True)


def _load_mlx_dir(spec: ModelSpec, model_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from mlx_lm import load

    # mlx_lm.load downloads anything that is not an existing path; never let it.
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model {spec.id!r}: no config.json in {model_dir}")
    try:
        model, tokenizer, config = cast(
            tuple[Any, Any, dict[str, Any]], load(str(model_dir), return_config=True)
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        # FileNotFoundError (no weights), safetensors/MLX errors (corrupt files), ValueError
        # (unknown model type or weights that do not fit): all mean "this model cannot load".
        raise ModelLoadError(f"model {spec.id!r}: cannot load {model_dir}: {e}") from e
    return model, tokenizer, config


def _apply_adapter(spec: ModelSpec, model: nn.Module) -> None:
    """Put the adapter's LoRA layers on the base model, as mlx-lm's `load(adapter_path=...)`
    does; ModelLoadError if they do not fit it."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters

    assert spec.adapter_path is not None
    try:
        load_adapters(model, str(spec.adapter_path))
        model.eval()
        mx.eval(model.parameters())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        detail = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(
            f"adapter {spec.id!r} does not fit its base model {spec.base_id!r}: {detail}"
        ) from e


def _override_chat_template(tokenizer: TokenizerWrapper, template: str) -> None:
    # The wrapper prefers its own renderer (mlx-lm's chat_templates modules) over the
    # tokenizer's Jinja template; a configured template must win over both.
    tokenizer._tokenizer.chat_template = template
    tokenizer._chat_template = None
    tokenizer.has_chat_template = True


def _context_length(spec: ModelSpec, config: dict[str, Any]) -> int:
    native = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    if isinstance(native, int) and native > 0:
        return min(spec.context_length, native)
    return spec.context_length
