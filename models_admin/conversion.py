"""Converting and re-quantizing models with mlx-lm, step by step, into a staging folder.

The only module of models_admin that imports mlx, and only inside the functions: they run in the
job worker (or the command line), never in a web request. It follows `mlx_lm.convert` with
mlx-lm's own functions, split into steps so that a job can report each one and stop between
them; what it writes goes to the folder it is given, which the caller renames into place.
Deviations from `mlx_lm.convert`: no `*.py` files are copied from the source, no model card is
made (it may reach the network), and trust_remote_code is always off.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

from models_admin.progress import JobProgress

DTYPES = ("float16", "bfloat16", "float32")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# mlx-lm 0.32's mixed-precision recipes (mlx_lm.convert.QUANT_RECIPES).
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")


class _LogWriter(io.TextIOBase):
    """Sends what mlx-lm prints ("[INFO] Quantized model with 4.5 bits per weight") to the log."""

    def __init__(self, progress: JobProgress) -> None:
        self.progress = progress

    def write(self, text: str) -> int:
        if text.strip():
            self.progress.log(text.strip())
        return len(text)


def convert(
    *,
    source: Path,
    dest: Path,
    progress: JobProgress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    dequantize_first: bool = False,
) -> dict[str, Any]:
    """Load `source`, cast, (re)quantize and save an MLX model into `dest` (created here).

    Returns what was written: dtype, quantization, parameters, bits per weight. The worker
    lives on after the job, so MLX's buffer cache is emptied whatever happened.
    """
    try:
        return _convert(
            source=source,
            dest=dest,
            progress=progress,
            dtype=dtype,
            quantize=quantize,
            bits=bits,
            group_size=group_size,
            recipe=recipe,
            dequantize_first=dequantize_first,
        )
    finally:
        release_memory()


def release_memory() -> None:
    """Give back what the last model held: the job worker lives on after the job."""
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def _convert(
    *,
    source: Path,
    dest: Path,
    progress: JobProgress,
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
    progress.start_step(f"loading {source.name}")
    with contextlib.redirect_stdout(log):
        model, config = load_model(source, lazy=True, trust_remote_code=False)
        tokenizer = load_tokenizer(
            source,
            {"trust_remote_code": False},
            eos_token_ids=config.get("eos_token_id", None),
        )
    progress.check_cancelled()
    layers = list(getattr(model, "layers", []))
    # load, cast, quantize, one step per layer, the rest of the weights, write, tokenizer.
    total = 6 + len(layers)
    progress.start_step("preparing weights", total=total, done=1)

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
    progress.check_cancelled()

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
    for index, layer in enumerate(layers, start=1):
        progress.check_cancelled()
        progress.set_step_text(f"computing layer {index} of {len(layers)}")
        mx.eval(layer.parameters())
        progress.advance()
    progress.check_cancelled()
    progress.set_step_text("computing embeddings and head")
    mx.eval(model.parameters())
    progress.advance()
    progress.check_cancelled()

    parameters = int(get_total_parameters(model))
    bits_per_weight = float(compute_bits_per_weight(model))
    progress.set_step_text("writing weights")
    dest.mkdir(parents=True)
    save_model(dest, model, donate_model=True)
    progress.advance()
    progress.check_cancelled()

    progress.set_step_text("writing config and tokenizer")
    save_config(config, config_path=dest / "config.json")
    tokenizer.save_pretrained(str(dest))
    generation_config = source / "generation_config.json"
    if generation_config.is_file():
        shutil.copy(generation_config, dest / "generation_config.json")
    progress.advance()
    quantization = config.get("quantization") or {}
    return {
        "dtype": dtype or "",
        "bits": quantization.get("bits"),
        "group_size": quantization.get("group_size"),
        "recipe": recipe or "",
        "parameters": parameters,
        "bits_per_weight": round(bits_per_weight, 3),
    }
