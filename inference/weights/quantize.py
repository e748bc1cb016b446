"""Quantization: what may be asked for, and the maths of MLX's affine format.

The allowed bits, group sizes, dtypes and mixed-precision recipes are defined here once, for
the page's forms, the command line, the GGUF import and the safetensors conversion alike.
mlx is imported inside the functions.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from inference.weights.gguf.tensors import QUANT_GROUP_SIZE

if TYPE_CHECKING:
    import mlx.core as mx

# What mx.quantize's affine mode can store.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# mlx-lm 0.32's mixed-precision recipes (mlx_lm.convert.QUANT_RECIPES).
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
# What a safetensors conversion may cast the floating-point weights to.
DTYPES = ("float16", "bfloat16", "float32")
# The dtypes an imported GGUF's scales, biases and float matrices can have. bfloat16 is left
# out: on a CPU it is emulated (10x slower here) and its 8-bit mantissa costs accuracy.
IMPORT_DTYPES = ("float16", "float32")


def _quantization_config(layers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not layers:
        return None
    common = Counter((q["group_size"], q["bits"]) for q in layers.values()).most_common(1)[0][0]
    return {"group_size": common[0], "bits": common[1], "mode": "affine", **layers}


_REFINE_STEPS = 3
_CHUNK_ELEMENTS = 1 << 24


def affine_quantize(
    w: mx.array, *, bits: int, group_size: int, refine_steps: int = _REFINE_STEPS
) -> tuple[mx.array, mx.array, mx.array]:
    """`mx.quantize` (affine mode) with each group's scale and bias fitted to its values.

    `mx.quantize` maps each group's min and max onto the ends of the integer grid. Here that is
    the start: weighted least squares then re-fits (scale, bias) to the rounded integers and
    re-rounds, `refine_steps` times, keeping per group whichever fit has the smaller weighted
    squared error. The weights are llama.cpp's (`make_qkx2_quants`): rms(group) + |w|, so large
    weights, which matter most, are fitted more closely. A plain (unweighted) fit lowers the
    squared error further but lost perplexity on SmolLM2's 4-bit tied embeddings; this one gained
    everywhere we measured (docs/benchmarks.md: Gemma 3 270M at 4 bits 24.1 -> 19.8 against
    14.2 unquantized; SmolLM2 at 3 bits 122 -> 91). Returns MLX's packed layout:
    `mx.dequantize(*result, group_size=..., bits=...)` reads it. `refine_steps=0` is exactly
    `mx.quantize`.
    """
    import mlx.core as mx

    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns do not split into groups of {group_size}")
    step = max(1, _CHUNK_ELEMENTS // cols)
    parts = [
        _affine_quantize_rows(w[i : i + step], bits, group_size, refine_steps)
        for i in range(0, rows, step)
    ]
    if len(parts) == 1:
        return parts[0]
    packed, scales, biases = (mx.concatenate(list(p), axis=0) for p in zip(*parts, strict=True))
    return packed, scales, biases


def quantization_importance(groups: mx.array) -> mx.array:
    """How much each weight's error counts in `affine_quantize`: rms of its group + |w|."""
    import mlx.core as mx

    return mx.sqrt((groups * groups).mean(axis=-1, keepdims=True)) + mx.abs(groups)


def _affine_quantize_rows(
    w: mx.array, bits: int, group_size: int, refine_steps: int
) -> tuple[mx.array, mx.array, mx.array]:
    import mlx.core as mx

    rows, cols = w.shape
    top = 2**bits - 1
    w = w.astype(mx.float32)
    packed, scale, bias = mx.quantize(w, group_size=group_size, bits=bits)
    if refine_steps == 0:
        return packed, scale, bias
    g = w.reshape(rows, cols // group_size, group_size)
    scale, bias = scale[..., None], bias[..., None]
    importance = quantization_importance(g)
    total = importance.sum(axis=-1, keepdims=True)
    total = mx.where(total > 0, total, 1.0)  # an all-zero group: nothing to fit

    def fit(scale: mx.array, bias: mx.array) -> tuple[mx.array, mx.array]:
        # mx.quantize's scales can be negative (the bias is then the group's max). A constant
        # group has scale 0 and its value in the bias: q = 0 throughout.
        safe = mx.where(scale != 0, scale, 1.0)
        q = mx.where(scale != 0, mx.clip(mx.round((g - bias) / safe), 0, top), 0)
        return q, (importance * (q * scale + bias - g) ** 2).sum(axis=-1, keepdims=True)

    # Start from mx.quantize's own fit, so no group ever ends up worse than with it.
    q, err = fit(scale, bias)
    w_mean = (importance * g).sum(axis=-1, keepdims=True) / total
    for _ in range(refine_steps):
        q_mean = (importance * q).sum(axis=-1, keepdims=True) / total
        dq = q - q_mean
        var = (importance * dq * dq).sum(axis=-1, keepdims=True)
        cov = (importance * dq * (g - w_mean)).sum(axis=-1, keepdims=True)
        fitted = cov / mx.where(var > 0, var, 1.0)
        new_scale = mx.where((var > 0) & (fitted != 0), fitted, scale)
        new_bias = w_mean - new_scale * q_mean
        new_q, new_err = fit(new_scale, new_bias)
        better = new_err < err
        scale = mx.where(better, new_scale, scale)
        bias = mx.where(better, new_bias, bias)
        q = mx.where(better, new_q, q)
        err = mx.where(better, new_err, err)
        mx.eval(scale, bias, q, err)
    packed = _pack_bits(q.reshape(rows, cols).astype(mx.uint32), bits)
    return packed, scale.squeeze(-1), bias.squeeze(-1)


def _pack_bits(q: mx.array, bits: int) -> mx.array:
    """MLX's affine packing: each row's values as a little-endian bit stream, in uint32 words.

    Every 8 values make `bits` whole bytes, whatever the bit width; each half of an octet
    (4 values, at most 24 bits) is assembled in a uint32 and the bytes are cut from the two.
    """
    import mlx.core as mx

    rows, cols = q.shape
    octets = q.astype(mx.uint32).reshape(rows, cols // 8, 8)
    lo = octets[..., 0]
    hi = octets[..., 4]
    for i in range(1, 4):
        lo = lo | (octets[..., i] << (bits * i))
        hi = hi | (octets[..., 4 + i] << (bits * i))
    half = 4 * bits  # the bit where `hi` starts in the octet's stream
    out = []
    for k in range(bits):
        start = 8 * k
        byte = lo >> start if start < 32 else mx.zeros_like(lo)
        if start + 8 > half:
            byte = byte | (hi << (half - start) if half >= start else hi >> (start - half))
        out.append((byte & 0xFF).astype(mx.uint8))
    stream = mx.stack(out, axis=-1).reshape(rows, cols * bits // 8)
    return stream.view(mx.uint32)


class WeightSink:
    """Collects an mlx-lm model's weights tensor by tensor, re-quantizing where asked.

    Q4_0 / Q4_1 / Q8_0 weights arrive quantized and their integers are kept bit for bit. Float
    2-D weights (K-quants and the other types after dequantization, F16, BF16, F32 matrices) are
    quantized with `affine_quantize` when `bits` is set, else kept as floats. `dtype` is the
    dtype of every scale, bias and float matrix (None: as read). 1-D tensors (norms, biases)
    stay as they are.
    """

    def __init__(
        self,
        bits: int | None,
        group_size: int,
        *,
        dtype: str | None = None,
        refine: bool = True,
    ) -> None:
        if bits is not None and bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {bits}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, not {group_size}")
        if dtype is not None and dtype not in IMPORT_DTYPES:
            raise ValueError(f"dtype must be one of {IMPORT_DTYPES}, not {dtype!r}")
        self.bits = bits
        self.group_size = group_size
        self.dtype = dtype
        self.refine = refine
        self.weights: dict[str, mx.array] = {}
        self.layers: dict[str, dict[str, Any]] = {}
        self.source_types: dict[str, str] = {}
        self.kept: Counter[str] = Counter()
        self.requantized: Counter[str] = Counter()
        self.floats: Counter[str] = Counter()

    def add(self, module: str, parts: dict[str, mx.array], type_name: str) -> None:
        import mlx.core as mx

        weight = parts.get("weight")
        if weight is not None:
            self.source_types[module] = type_name
        if "scales" in parts:
            assert weight is not None
            self.kept[type_name] += 1
            bits = weight.shape[-1] * 32 // (parts["scales"].shape[-1] * QUANT_GROUP_SIZE)
            self.layers[module] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
            parts = dict(parts, scales=self._cast(parts["scales"]))
            parts["biases"] = self._cast(parts["biases"])
        elif weight is not None and weight.ndim == 2:
            if self.bits is not None and weight.shape[-1] % self.group_size == 0:
                steps = _REFINE_STEPS if self.refine else 0
                wq, scales, biases = affine_quantize(
                    weight, bits=self.bits, group_size=self.group_size, refine_steps=steps
                )
                # Without a dtype, the scales take the one GGUF's Q4_0/Q8_0 blocks carry.
                dtype = getattr(mx, self.dtype or "float16")
                parts = dict(parts, weight=wq, scales=scales.astype(dtype))
                parts["biases"] = biases.astype(dtype)
                self.layers[module] = {"group_size": self.group_size, "bits": self.bits}
                self.requantized[type_name] += 1
            else:
                parts = dict(parts, weight=self._cast(weight))
                self.floats[type_name] += 1
        for suffix, value in parts.items():
            self.weights[f"{module}.{suffix}"] = value
        mx.eval(list(parts.values()))

    def _cast(self, x: mx.array) -> mx.array:
        import mlx.core as mx

        return x if self.dtype is None else x.astype(getattr(mx, self.dtype))

    def quantization(self) -> dict[str, Any] | None:
        """mlx-lm's `quantization` config: defaults plus an entry for every quantized layer."""
        if self.bits is not None and self.requantized:
            return {
                "group_size": self.group_size,
                "bits": self.bits,
                "mode": "affine",
                **self.layers,
            }
        return _quantization_config(self.layers)

    def summary(self) -> dict[str, Any]:
        """How each weight matrix was stored, by its GGML type in the file."""
        return {
            "kept": dict(sorted(self.kept.items())),
            "requantized": {
                "bits": self.bits,
                "group_size": self.group_size if self.bits is not None else None,
                "tensors": sum(self.requantized.values()),
                "from": dict(sorted(self.requantized.items())),
            },
            "float": sum(self.floats.values()),
            "float_from": dict(sorted(self.floats.items())),
            "dtype": self.dtype,
        }


def default_dtype(model_type: str) -> str:
    """The dtype of an imported model's scales and float weights, by mlx-lm model type.

    float16, what GGUF blocks carry, except for Gemma: its activations overflow float16 (they
    follow the scales' dtype), which cost Gemma 3 270M 3% of perplexity at 8 bits.
    """
    return "float32" if model_type == "gemma3_text" else "float16"
