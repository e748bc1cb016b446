"""Making MLX models: a GGUF file imported, a safetensors model converted, an MLX model
re-quantized. One staging step and one provenance record for all three.

Every model is written into a hidden staging folder next to its destination (`staged`) and
renamed into place when complete, so a crash, an error or a cancel never leaves a half-written
model where a loader or a scan would find it. Every model made here carries `PROVENANCE_FILE`:
what it was made from (kind and path; a file's size and modification time) and how, which is
what validation reads to find the reference to compare it with.

GGUF: tensors of the block types MLX has a native layout for (Q4_0, Q4_1, Q8_0: group size 32)
stay quantized, exactly as `mx.load` returns them, and the model gets `QuantizedLinear` /
`QuantizedEmbedding` layers with per-layer bits. Every other type (K-quants, BF16, ...) is
dequantized with the `gguf` package, then re-quantized to MLX's affine format at the bits and
group size asked for, or kept as floats. transformers' own GGUF loader is never used: it
imports torch. The chat's loader converts GGUF files with the same `import_gguf`.

Safetensors: follows `mlx_lm.convert` with mlx-lm's own functions, split into steps so that a
job can report each one and stop between them. Deviations from `mlx_lm.convert`: no `*.py`
files are copied from the source, no model card is made (it may reach the network), and
trust_remote_code is always off.

mlx and mlx-lm are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from inference.weights.gguf.architectures import architecture as gguf_architecture
from inference.weights.gguf.architectures import build_config, to_mlx_tensor
from inference.weights.gguf.reader import GGUFError, read_header, type_name
from inference.weights.gguf.tensors import check_tensor_types, iter_raw_tensors
from inference.weights.gguf.tokenizer import build_tokenizer, detokenizer_class
from inference.weights.progress import Progress, check_cancelled
from inference.weights.quantize import DTYPES, GROUP_SIZES, WeightSink, default_dtype

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Written into every model made here: where it came from and how it was made. (Models imported
# before this record was the only one also hold an `mlxweb_import.json`, which nothing reads.)
PROVENANCE_FILE = "mlxweb_source.json"
PROVENANCE_KINDS = ("gguf", "hf", "mlx")


@dataclass
class GGUFModel:
    """A GGUF model read into memory, in mlx-lm's terms."""

    architecture: str
    config: dict[str, Any]
    weights: dict[str, mx.array]
    tokenizer: PreTrainedTokenizerFast
    chat_template: str | None
    # mlx-lm module path -> the GGML type its weight had in the file ("Q4_K", "F32", ...).
    source_types: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportResult:
    """What `import_gguf` wrote: the MLX directory and how each tensor got there."""

    out_dir: Path
    source: Path
    architecture: str
    model_type: str
    parameters: int
    # {"kept": {"Q8_0": n, ...}, "requantized": {"bits", "group_size", "tensors", "from"},
    #  "float": n}; see `WeightSink.summary`.
    quantization: dict[str, Any]
    size_bytes: int
    source_size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable (paths as strings)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["source"] = str(self.source)
        return data


# --------------------------------------------------------------------------- staging, provenance


def staging_dir(dest: Path, tag: str | None = None) -> Path:
    """Where `dest` is written before it is renamed into place: hidden, next to it (scans and
    the chat's catalogue skip dot-folders, and the rename stays on one disk). `tag` names it
    (a job's code, so that a job's leftovers can be told from a running job's)."""
    return Path(dest).parent / f".staging-{tag or uuid.uuid4().hex[:12]}"


def publish(staging: Path, dest: Path, *, overwrite: bool = False) -> None:
    """Move a finished model from its staging folder to `dest`, in one rename."""
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dest} already exists")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    os.rename(staging, dest)


@contextlib.contextmanager
def staged(
    dest: Path,
    *,
    tag: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Iterator[Path]:
    """A staging folder path for `dest` (not created), published to `dest` when the block ends;
    removed, whatever it holds, when the block raises."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(dest, tag)
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
        publish(staging, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if progress is not None:
            progress.log("removed the unfinished output")
        raise


def provenance_record(kind: str, origin: Path, /, **extra: Any) -> dict[str, Any]:
    """What `PROVENANCE_FILE` holds: the kind of source ("gguf": a GGUF file; "hf": a
    safetensors folder; "mlx": an MLX model that was re-quantized), its path, enough to tell
    whether it changed since (a file's size and modification time), and `extra`."""
    if kind not in PROVENANCE_KINDS:
        raise ValueError(f"kind must be one of {PROVENANCE_KINDS}, not {kind!r}")
    record: dict[str, Any] = {
        "kind": kind,
        "path": str(origin),
        "recorded_at": datetime.now(UTC).isoformat(),
    }
    if origin.is_file():
        stat = origin.stat()
        record.update(size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    record.update(extra)
    return record


def write_provenance(model_dir: Path, record: dict[str, Any]) -> None:
    (model_dir / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_provenance(model_dir: Path) -> dict[str, Any] | None:
    """The record of what a model made here was made from, or None (not made here, or
    unreadable)."""
    try:
        record = json.loads((Path(model_dir) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") not in PROVENANCE_KINDS:
        return None
    if not isinstance(record.get("path"), str):
        return None
    return record


# --------------------------------------------------------------------------- MLX helpers


def parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """The model's parameters as (dotted name, array) pairs."""
    from mlx.utils import tree_flatten

    return cast(list[tuple[str, "mx.array"]], tree_flatten(model.parameters()))


def release_memory() -> None:
    """Give back what the last model held: a worker lives on after its job."""
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


# --------------------------------------------------------------------------- GGUF


def _read(
    path: Path,
    make_sink: Callable[[str], WeightSink],
    *,
    dequantize_all: bool = False,
    progress: Progress | None = None,
) -> tuple[GGUFModel, WeightSink]:
    """Read a GGUF file tensor by tensor into the sink made for its model type."""
    header = read_header(path)
    architecture = gguf_architecture(header.metadata, path)
    check_tensor_types(path, header)
    infos = {t.name: t for t in header.tensors}
    config = build_config(header.metadata, architecture, infos, path)
    sink = make_sink(config["model_type"])
    tokenizer = build_tokenizer(header.metadata, path)
    check_cancelled(progress)
    if progress is not None:
        progress.step("tensors", total=len(header.tensors))
    for info, arrays in iter_raw_tensors(path, header, dequantize_all=dequantize_all):
        mapped = to_mlx_tensor(info, arrays, config, path)
        if mapped is not None:
            sink.add(*mapped, type_name(info.type_id))
        if progress is not None:
            progress.advance()
        check_cancelled(progress)
    quantization = sink.quantization()
    if quantization is not None:
        config["quantization"] = quantization
    gguf_model = GGUFModel(
        architecture=architecture,
        config=config,
        weights=sink.weights,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        source_types=sink.source_types,
    )
    return gguf_model, sink


def read_gguf(path: Path, *, dequantize: bool = False) -> GGUFModel:
    """Read a GGUF model file into memory in mlx-lm's terms. Raises `GGUFError`.

    Q4_0 / Q4_1 / Q8_0 weights stay quantized and other types are dequantized to float16 (or
    bfloat16; float32 for Gemma, see `default_dtype`), unless `dequantize` is set: then every
    tensor is float32, the reference a converted model is compared with.
    """

    def make_sink(model_type: str) -> WeightSink:
        dtype = None if dequantize or model_type != "gemma3_text" else default_dtype(model_type)
        return WeightSink(None, GROUP_SIZES[0], dtype=dtype)

    return _read(Path(path), make_sink, dequantize_all=dequantize)[0]


def _instantiate(gguf_model: GGUFModel) -> nn.Module:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    config = gguf_model.config
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = dict(gguf_model.weights)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization") or {}

    def quantized_here(path: str, module: nn.Module) -> bool | dict[str, int]:
        params = quantization.get(path)
        return dict(params) if isinstance(params, dict) else False

    if quantization:
        nn.quantize(model, class_predicate=quantized_here)
    model.eval()
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GGUFError(f"the weights do not fit the {config['model_type']} model: {e}") from e
    mx.eval(model.parameters())
    return model


def build_model(gguf_model: GGUFModel) -> tuple[nn.Module, TokenizerWrapper]:
    """An mlx-lm model and tokenizer, ready to generate, from a model read by `read_gguf`."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model = _instantiate(gguf_model)
    wrapper = TokenizerWrapper(
        gguf_model.tokenizer,
        detokenizer_class(gguf_model.tokenizer),
        eos_token_ids=gguf_model.config.get("eos_token_id"),
    )
    return model, wrapper


def _write_model_dir(
    gguf_model: GGUFModel,
    staging: Path,
    *,
    progress: Progress | None,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Write `gguf_model` as an mlx-lm directory into `staging` (see `staged`); its parameters.

    The weights are loaded into the real mlx-lm model first (strictly), so a directory is only
    ever written for weights that fit.
    """
    from mlx_lm.utils import get_total_parameters, save_config, save_model

    model = _instantiate(gguf_model)
    parameters = int(get_total_parameters(model))
    check_cancelled(progress)
    if progress is not None:
        progress.step("save", total=1)
    save_model(staging, model)
    del model
    save_config(copy.deepcopy(gguf_model.config), staging / "config.json")
    gguf_model.tokenizer.save_pretrained(staging)
    if provenance is not None:
        write_provenance(staging, provenance)
    check_cancelled(progress)
    return parameters


def import_gguf(
    path: Path,
    out_dir: Path,
    *,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    refine: bool = True,
    progress: Progress | None = None,
    overwrite: bool = False,
    tag: str | None = None,
    record: dict[str, Any] | None = None,
) -> ImportResult:
    """Import a GGUF file as an mlx-lm model directory at `out_dir`.

    Reads the file a tensor at a time, so memory holds the converted model plus one tensor
    in float32, never the whole model dequantized. Q4_0 / Q4_1 / Q8_0 are kept exactly;
    K-quants and the other types are dequantized, then re-quantized to `bits` in
    `quantize.BITS` with `group_size` in `quantize.GROUP_SIZES` when `bits` is given, else
    stored as floats. Scales, biases and float matrices are `dtype` ("float16" or "float32";
    by default `default_dtype`: float32 for Gemma). Re-quantization fits each group's scale and
    bias to its values (`affine_quantize`); `refine=False` takes `mx.quantize`'s min/max fit as
    it is (faster, less accurate). The tokenizer and chat template come from the file's
    metadata.

    Reports "tensors" (one per tensor read) then "save", and stops between tensors when the
    progress is cancelled (`ConversionCancelled`). Bad files raise a `GGUFError` subclass
    naming the file and the problem; nothing is left at `out_dir` or in a staging folder
    (named by `tag`) after an error or a cancel. An existing `out_dir` is an error unless
    `overwrite`. The provenance record gets `record`'s keys too.
    """
    started = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    WeightSink(bits, group_size, dtype=dtype)  # bad arguments fail before any work

    def make_sink(model_type: str) -> WeightSink:
        dtype_here = dtype or default_dtype(model_type)
        return WeightSink(bits, group_size, dtype=dtype_here, refine=refine)

    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists")
    with staged(out_dir, tag=tag, overwrite=overwrite, progress=progress) as staging:
        gguf_model, sink = _read(path, make_sink, progress=progress)
        summary = sink.summary()
        provenance = provenance_record(
            "gguf",
            path,
            source=path.name,
            source_size_bytes=path.stat().st_size,
            architecture=gguf_model.architecture,
            quantization=summary,
            dtype=sink.dtype,
            source_types=dict(Counter(sink.source_types.values())),
            **(record or {}),
        )
        parameters = _write_model_dir(gguf_model, staging, progress=progress, provenance=provenance)
    if progress is not None:
        progress.advance()
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    result = ImportResult(
        out_dir=out_dir,
        source=path,
        architecture=gguf_model.architecture,
        model_type=gguf_model.config["model_type"],
        parameters=parameters,
        quantization=summary,
        size_bytes=size,
        source_size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "imported %s (%s, %d parameters) into %s in %.1fs",
        path.name,
        result.architecture,
        parameters,
        out_dir,
        result.seconds,
    )
    return result


# --------------------------------------------------------------------------- safetensors


class _LogWriter(io.TextIOBase):
    """Sends what mlx-lm prints ("[INFO] Quantized model with 4.5 bits per weight") to the log."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def write(self, text: str) -> int:
        if text.strip():
            self.progress.log(text.strip())
        return len(text)


def convert_model(
    *,
    source: Path,
    dest: Path,
    progress: Progress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    dequantize_first: bool = False,
    tag: str | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load `source`, cast, (re)quantize and save an MLX model at `dest` (which must not exist).

    The provenance record says kind "mlx" when the source was re-quantized
    (`dequantize_first`), "hf" otherwise, plus `record`'s keys. Returns what was written:
    dtype, quantization, parameters, bits per weight. MLX's buffer cache is emptied whatever
    happened: the caller (a job worker) lives on.
    """
    try:
        with staged(dest, tag=tag, progress=progress) as staging:
            info = _convert(
                source=source,
                dest=staging,
                progress=progress,
                dtype=dtype,
                quantize=quantize,
                bits=bits,
                group_size=group_size,
                recipe=recipe,
                dequantize_first=dequantize_first,
            )
            kind = "mlx" if dequantize_first else "hf"
            write_provenance(staging, provenance_record(kind, source, **(record or {})))
            check_cancelled(progress)
            total = info.pop("steps")
            progress.step(f"moving into place as {dest.name}", total=total, done=total)
        return info
    finally:
        release_memory()


def _convert(
    *,
    source: Path,
    dest: Path,
    progress: Progress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    dequantize_first: bool = False,
) -> dict[str, Any]:
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import (
        compute_bits_per_weight,
        dequantize_model,
        get_total_parameters,
        load_model,
        load_tokenizer,
        quantize_model,
        save_config,
        save_model,
    )

    log = _LogWriter(progress)
    progress.step(f"loading {source.name}")
    with contextlib.redirect_stdout(log):
        model, config = load_model(source, lazy=True, trust_remote_code=False)
        tokenizer = load_tokenizer(
            source,
            {"trust_remote_code": False},
            eos_token_ids=config.get("eos_token_id", None),
        )
    check_cancelled(progress)
    layers = list(getattr(model, "layers", []))
    # load, cast, quantize, one step per layer, the rest of the weights, write, tokenizer.
    total = 6 + len(layers)
    progress.step("preparing weights", total=total, done=1)

    if dequantize_first and ("quantization" in config or "quantization_config" in config):
        progress.log("dequantizing the source model")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    if dtype is None:
        dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if dtype in DTYPES:
        progress.log(f"casting floating-point weights to {dtype}")
        target = getattr(mx, dtype)
        cast_predicate = getattr(model, "cast_predicate", lambda _: True)

        def set_dtype(key: str, value: Any) -> Any:
            if cast_predicate(key) and mx.issubdtype(value.dtype, mx.floating):
                return value.astype(target)
            return value

        model.update(tree_map_with_path(set_dtype, model.parameters()))
    progress.advance()
    check_cancelled(progress)

    if quantize:
        progress.log(f"quantizing to {recipe or f'{bits} bits'}, group size {group_size or 64}")
        predicate = None
        if recipe:
            predicate = mixed_quant_predicate_builder(recipe, model, group_size or 64)
        with contextlib.redirect_stdout(log):
            # mlx-lm annotates the recipe predicate with three arguments and calls it with two.
            model, config = quantize_model(
                model,
                config,
                group_size,
                bits,
                mode="affine",
                quant_predicate=predicate,  # type: ignore[arg-type]
            )
    progress.advance()

    # The graph is lazy: evaluating layer by layer is where the time goes, and where a
    # cancel is seen between layers instead of after the whole model.
    done = 3
    progress.step(f"computing {len(layers)} layers", total=total, done=done)
    for layer in layers:
        check_cancelled(progress)
        mx.eval(layer.parameters())
        progress.advance()
        done += 1
    check_cancelled(progress)
    progress.step("computing embeddings and head", total=total, done=done)
    mx.eval(model.parameters())
    progress.advance()
    check_cancelled(progress)

    parameters = int(get_total_parameters(model))
    bits_per_weight = float(compute_bits_per_weight(model))
    progress.step("writing weights", total=total, done=done + 1)
    dest.mkdir(parents=True)
    save_model(dest, model, donate_model=True)
    progress.advance()
    check_cancelled(progress)

    progress.step("writing config and tokenizer", total=total, done=done + 2)
    save_config(config, config_path=dest / "config.json")
    tokenizer.save_pretrained(str(dest))
    generation_config = source / "generation_config.json"
    if generation_config.is_file():
        shutil.copy(generation_config, dest / "generation_config.json")
    progress.advance()
    quantization = config.get("quantization") or {}
    return {
        "steps": total,
        "dtype": dtype or "",
        "bits": quantization.get("bits"),
        "group_size": quantization.get("group_size"),
        "recipe": recipe or "",
        "parameters": parameters,
        "bits_per_weight": round(bits_per_weight, 3),
    }
