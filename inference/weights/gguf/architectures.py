"""Per-architecture knowledge: a GGUF's hyperparameters as an mlx-lm config, and its tensor
names as mlx-lm module paths (undoing what llama.cpp's converter did to some tensors).

Mapped: the llama family (`llama`, which llama.cpp also uses for Mistral, SmolLM and TinyLlama,
and `qwen2`) and `gemma3` (its text model); anything else raises `UnsupportedArchitecture`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.weights.gguf.reader import GGUFError, TensorInfo
from inference.weights.gguf.tensors import F32, unpermute_rows
from inference.weights.gguf.tokenizer import special_token_ids

if TYPE_CHECKING:
    import mlx.core as mx

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")
# Architecture in the file -> mlx-lm model_type. llama.cpp writes Mistral 7B, SmolLM and
# TinyLlama as "llama"; "mistral" is accepted for hand-made files that say so.
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

# GGUF tensor name (inside a block) -> mlx-lm module path.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block and per-head Q/K norms. llama.cpp calls the norm before
# the MLP `ffn_norm` here too, but in Gemma it is the *pre*-feed-forward one.
_GEMMA3_BLOCK_NAMES = _BLOCK_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors llama.cpp writes for its own use that have no place in the mlx-lm model.
_IGNORED_TENSORS = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias|scales|biases)$")


class UnsupportedArchitecture(GGUFError):
    """The GGUF file is fine but its architecture has no mapping onto an mlx-lm model."""

    def __init__(self, architecture: str, path: Path | None = None) -> None:
        self.architecture = architecture
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        where = f"{Path(path).name}: " if path is not None else ""
        super().__init__(
            f"{where}GGUF architecture {architecture!r} is not supported (supported: {supported})"
        )


def _module_path(name: str, config: dict[str, Any], path: Path) -> tuple[str, str, str] | None:
    """(mlx-lm module path, GGUF part name, suffix) of a GGUF tensor; None for ignored ones."""
    if _IGNORED_TENSORS.match(name):
        return None
    match = _TENSOR_NAME.match(name)
    target = None
    part = suffix = ""
    if match is not None:
        block, part, suffix = match.groups()
        if block is None:
            target = _TOP_NAMES.get(part)
        else:
            names = _GEMMA3_BLOCK_NAMES if config["model_type"] == "gemma3_text" else _BLOCK_NAMES
            if part in names:
                target = f"model.layers.{block}.{names[part]}"
    if target is None:
        raise GGUFError(
            f"{path.name}: tensor {name!r} has no counterpart in mlx-lm's "
            f"{config['model_type']} model"
        )
    return target, part, suffix


def to_mlx_tensor(
    info: TensorInfo, arrays: dict[str, mx.array], config: dict[str, Any], path: Path
) -> tuple[str, dict[str, mx.array]] | None:
    """One GGUF tensor as (module path, {"weight": ..., ...}) of mlx-lm's model, or None.

    Undoes what llama.cpp's converter did to it: the Q/K row permutation of llama models, and
    the +1 that it folds into every Gemma norm weight (mlx-lm's Gemma RMSNorm scales by
    `1 + weight`, as Hugging Face's does).
    """
    mapped = _module_path(info.name, config, path)
    if mapped is None:
        return None
    module, part, _ = mapped
    out = {name.rsplit(".", 1)[1]: value for name, value in arrays.items()}
    model_type = config["model_type"]
    if model_type == "llama" and part in ("attn_q", "attn_k"):
        heads = config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
        out = {k: unpermute_rows(v, heads) for k, v in out.items()}
    elif model_type == "gemma3_text" and part.endswith("norm"):
        out = {k: v - 1.0 for k, v in out.items()}
    return module, out


def architecture(metadata: dict[str, Any], path: Path) -> str:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path.name}: no general.architecture in the metadata")
    if arch not in _MODEL_TYPES:
        raise UnsupportedArchitecture(arch, path)
    return arch


def build_config(
    metadata: dict[str, Any], architecture: str, tensors: dict[str, TensorInfo], path: Path
) -> dict[str, Any]:
    def hp(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{architecture}.{key}", default)
        if value is None:
            raise GGUFError(f"{path.name}: metadata {architecture}.{key} is missing")
        if isinstance(value, np.ndarray):
            raise GGUFError(
                f"{path.name}: metadata {architecture}.{key} varies per layer, which the "
                f"{architecture} model does not support"
            )
        return value

    model_type = _MODEL_TYPES[architecture]
    hidden = int(hp("embedding_length"))
    heads = int(hp("attention.head_count"))
    kv_heads = int(hp("attention.head_count_kv", heads))
    embed = tensors.get("token_embd.weight")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{architecture}.vocab_size") or (
        embed.shape[0] if embed is not None else len(tokens or [])
    )
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [_HF_ARCHITECTURES[model_type]],
        "hidden_size": hidden,
        "num_hidden_layers": int(hp("block_count")),
        "intermediate_size": int(hp("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(hp("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(hp("context_length", 4096)),
        "rope_theta": float(hp("rope.freq_base", 10000.0 if model_type == "llama" else 1e6)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if metadata.get(f"{architecture}.{key}"):
            raise GGUFError(
                f"{path.name}: {architecture}.{key} is set, which mlx-lm's {model_type} "
                "model does not implement"
            )
    head_dim = metadata.get(f"{architecture}.attention.key_length")
    if model_type == "gemma3_text":
        pattern = metadata.get(f"{architecture}.attention.sliding_window_pattern")
        layers = config["num_hidden_layers"]
        config.update(_gemma3_config(hp, pattern, hidden, heads, layers, path))
    elif head_dim is not None and int(head_dim) != hidden // heads:
        if model_type != "llama":
            raise GGUFError(f"{path.name}: a head size other than hidden/heads is not supported")
        config["head_dim"] = int(head_dim)
    if model_type == "llama" and any(n.endswith("attn_q.bias") for n in tensors):
        config["attention_bias"] = True

    scaling = metadata.get(f"{architecture}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"{path.name}: rope scaling {scaling!r} is not supported")
        config["rope_scaling"] = {"type": "linear", "factor": float(hp("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensors:
        config["rope_scaling"] = _llama3_rope_scaling(path, config, tensors["rope_freqs.weight"])

    ids = special_token_ids(metadata, architecture)
    if ids["bos"] is not None:
        config["bos_token_id"] = ids["bos"]
    if ids["eos"]:
        config["eos_token_id"] = ids["eos"]
    return config


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _gemma3_config(
    hp: Callable[..., Any], pattern: Any, hidden: int, heads: int, layers: int, path: Path
) -> dict[str, Any]:
    """Gemma 3's own hyperparameters, with llama.cpp's defaults where the file has none.

    llama.cpp (src/llama-model.cpp) hard-codes what older converters did not write: every sixth
    layer global, the others sliding-window with rope base 10000; attention scaled by
    1/sqrt(head_dim), except the 27B (62 layers) which uses 1/sqrt(hidden/heads).
    """
    head_dim = int(hp("attention.key_length", 256))
    if int(hp("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path.name}: gemma3 with different key and value head sizes")
    scale = hp("attention.scale", 0.0)
    # transformers' Gemma3TextConfig (which AutoTokenizer reads) insists on an int here.
    if scale:
        query_pre_attn_scalar = round(1.0 / float(scale) ** 2)
    else:
        query_pre_attn_scalar = hidden // heads if layers == 62 else head_dim
    return {
        "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "rope_local_base_freq": float(hp("rope.freq_base_swa", 10000.0)),
        "sliding_window": int(hp("attention.sliding_window", 512)),
        "sliding_window_pattern": _sliding_window_pattern(pattern, layers, path),
    }


def _sliding_window_pattern(value: Any, layers: int, path: Path) -> int:
    """mlx-lm's period of global layers, from an int or llama.cpp's per-layer "is SWA" flags."""
    if value is None:
        return 6
    if not isinstance(value, np.ndarray | list):
        return int(value)
    flags = [bool(v) for v in value]
    period = flags.index(False) + 1 if False in flags else len(flags) + 1
    if len(flags) != layers or flags != [(i + 1) % period != 0 for i in range(layers)]:
        raise GGUFError(
            f"{path.name}: this per-layer sliding window pattern is not supported: mlx-lm's "
            "gemma3 model needs one global layer every N"
        )
    return period


def _llama3_rope_scaling(path: Path, config: dict[str, Any], info: TensorInfo) -> dict[str, Any]:
    """Recognise Llama 3.1's rope frequency factors and name them the way mlx-lm wants.

    llama.cpp stores the per-frequency factors as a tensor; mlx-lm computes them from four
    numbers. Meta's released models all use the same three, so fit the factor and check.
    """
    if info.type_id != F32:
        raise GGUFError(f"{path.name}: rope_freqs.weight is not float32")
    with path.open("rb") as f:
        f.seek(info.offset)
        factors = np.frombuffer(f.read(info.nbytes), dtype="<f4")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    wavelens = 2 * math.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    low, high = 8192 / 1.0, 8192 / 4.0
    smooth = (8192 / wavelens - 1.0) / (4.0 - 1.0)
    factor = float(factors.max())
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    medium = 1 / ((1 - smooth) / factor + smooth)
    expected = np.where(wavelens < high, 1.0, np.where(wavelens > low, factor, medium))
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise GGUFError(f"{path.name}: rope frequency factors of an unknown kind")
    return scaling
