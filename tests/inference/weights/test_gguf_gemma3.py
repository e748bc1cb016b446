"""Gemma 3 GGUF files: the mapping onto mlx-lm's gemma3_text model, the tokenizer, the import.

The real file is Gemma 3 270M Q4_K_M (base model). Expected token ids and greedy tokens below
were produced by llama.cpp itself (llama-cpp-python 0.3.36) on the same file, and on a float32
GGUF of its dequantized weights for the greedy tokens: the in-memory reference must match them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
import pytest

from inference.weights.convert import ImportResult, build_model, read_gguf
from inference.weights.gguf import GGUFError, read_header
from inference.weights.gguf.tokenizer import GEMMA_CHAT_TEMPLATE
from tests.inference.weights.test_gguf import _write_gguf

# (text, ids) from llama.cpp's tokenizer on the real file (add_bos, special tokens parsed).
LLAMA_CPP_TOKENS = [
    ("Hello world", [2, 9259, 1902]),
    (" leading space", [2, 5830, 2557]),
    (
        "two  spaces and\ttab\nnewline\n\nend",
        [2, 13498, 138, 35220, 532, 255968, 4823, 107, 73481, 108, 643],
    ),
    (
        "Héllo wörld: 你好 🎉, it's 12345!",
        [2, 236814, 7869, 844, 515, 4010, 671, 236787, 43758, 237389, 204906, 236764, 625,
         236789, 236751, 236743, 236770, 236778, 236800, 236812, 236810, 236888],
    ),
    (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107],
    ),
    (
        "code:\n    def f(x):\n        return x**2  # comment",
        [2, 3970, 236787, 107, 140, 2063, 517, 236769, 236781, 1473, 107, 144, 2060, 1123, 1018,
         236778, 138, 236865, 5739],
    ),
    ("   ", [2, 139]),
    ("trailing space ", [2, 136697, 2557, 236743]),
]  # fmt: skip
# llama.cpp's greedy continuation of "The capital of France is" with the dequantized weights
# written back as a float32 GGUF.
LLAMA_CPP_GREEDY = [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207]
LLAMA_CPP_GREEDY += [528, 7001, 532]


def _greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


# --------------------------------------------------------------------------- a synthetic model

_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _spm_tokenizer_metadata() -> dict[str, Any]:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "▁he", "▁hello"]
    pieces += ["or", "ld", "▁w", "▁wor", "▁world", "\n", "user", "model"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += ["<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces) + [3, 3]
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_space_prefix": 0,
    }


def _write_gemma3_gguf(
    path: Path, pattern: Any = 2, extra: dict[str, Any] | None = None
) -> tuple[Path, Any]:
    """A random 4-layer gemma3_text model written the way llama.cpp's converter writes one."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.gemma3_text import Model, ModelArgs

    meta = _spm_tokenizer_metadata()
    config = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # not hidden / heads: Gemma sets it on its own
        "rms_norm_eps": 1e-6,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 32,
        "sliding_window": 4,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 1024,
    }
    mx.random.seed(11)
    original = Model(ModelArgs.from_dict(config))
    # Non-trivial norms: llama.cpp stores them plus one, which the reader must take off.
    params = cast(list[tuple[str, mx.array]], tree_flatten(original.parameters()))
    original.load_weights(
        [(k, mx.random.normal(v.shape) * 0.3 if "norm" in k else v) for k, v in params]
    )
    original.sanitize({})  # tied embeddings, like Gemma's
    mx.eval(original.parameters())

    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for name, value in cast(list[tuple[str, mx.array]], tree_flatten(original.parameters())):
        array = np.array(value.astype(mx.float32))
        if name.endswith("norm.weight"):
            array = array + 1.0
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = (array, None)
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = (array, None)
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            tensors[f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"] = (array, None)
    kv: dict[str, Any] = {
        "gemma3.context_length": 1024,
        "gemma3.embedding_length": 64,
        "gemma3.block_count": 4,
        "gemma3.feed_forward_length": 96,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2,
        "gemma3.attention.key_length": 32,
        "gemma3.attention.value_length": 32,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.rope.freq_base": 1_000_000.0,
        "gemma3.attention.sliding_window": 4,
    }
    if pattern is not None:
        kv["gemma3.attention.sliding_window_pattern"] = pattern
    kv.update(extra or {})
    return _write_gguf(path, "gemma3", tensors, **kv, **meta), original


@pytest.mark.parametrize("pattern", [2, [True, False, True, False]])
def test_it_converts_a_gemma3_model_to_the_same_logits(pattern: Any, tmp_path: Path) -> None:
    path, original = _write_gemma3_gguf(tmp_path / "gemma3.gguf", pattern)
    converted = read_gguf(path)
    config = converted.config
    assert config["model_type"] == "gemma3_text"
    assert config["head_dim"] == 32 and config["query_pre_attn_scalar"] == 32
    assert config["sliding_window"] == 4 and config["sliding_window_pattern"] == 2
    assert config["rope_theta"] == 1e6 and config["rope_local_base_freq"] == 1e4
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == [1, 282]  # <eos> and <end_of_turn>
    model, tokenizer = build_model(converted)
    # Longer than the sliding window, so local and global layers differ.
    tokens = mx.array([[2, 271, 277, 270, 274, 266, 280, 272, 263, 273, 275]])
    assert mx.allclose(model(tokens), original(tokens), atol=1e-4).item()

    messages = [{"role": "user", "content": "hello"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(prompt) == (
        "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    )


def test_it_refuses_a_sliding_window_pattern_mlx_lm_cannot_express(tmp_path: Path) -> None:
    path, _ = _write_gemma3_gguf(tmp_path / "odd.gguf", [True, False, False, True])
    with pytest.raises(GGUFError, match=r"odd\.gguf: this per-layer sliding window pattern"):
        read_gguf(path)


def test_it_refuses_logit_softcapping_gemma3_does_not_have(tmp_path: Path) -> None:
    path, _ = _write_gemma3_gguf(
        tmp_path / "capped.gguf", extra={"gemma3.final_logit_softcapping": 30.0}
    )
    with pytest.raises(GGUFError, match="final_logit_softcapping is set"):
        read_gguf(path)


# --------------------------------------------------------------------------- the real model


def test_it_reads_gemma3_270m_hyperparameters(gemma3_gguf: Path) -> None:
    from inference.weights.gguf.architectures import build_config as _build_config

    header = read_header(gemma3_gguf)
    infos = {t.name: t for t in header.tensors}
    config = _build_config(header.metadata, "gemma3", infos, gemma3_gguf)
    assert config == config | {
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "intermediate_size": 2048,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "vocab_size": 262144,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
    }


def test_it_tokenizes_gemma3_exactly_like_llama_cpp(gemma3_reference: tuple[Any, Any]) -> None:
    tokenizer = gemma3_reference[1]._tokenizer  # read_tokenizer's, wrapped by build_model
    for text, ids in LLAMA_CPP_TOKENS:
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace(
            "<start_of_turn>", ""
        ).replace("<end_of_turn>", ""), text
    # The file has no chat template: Gemma's own format is supplied.
    assert tokenizer.chat_template == GEMMA_CHAT_TEMPLATE


def test_the_dequantized_reference_decodes_like_llama_cpp(
    gemma3_reference: tuple[Any, Any],
) -> None:
    model, tokenizer = gemma3_reference
    prompt = tokenizer.encode("The capital of France is")
    assert _greedy(model, prompt, 16) == LLAMA_CPP_GREEDY


def test_it_imports_gemma3_270m_at_4_bits(gemma3_4bit: ImportResult) -> None:
    result = gemma3_4bit
    assert result.architecture == "gemma3" and result.model_type == "gemma3_text"
    # Q8_0 (the embeddings and half the value projections) is kept; K-quants and Q5_0 are not.
    assert result.quantization["kept"] == {"Q8_0": 10}
    assert result.quantization["requantized"] == {
        "bits": 4,
        "group_size": 64,
        "tensors": 117,
        "from": {"Q4_K": 27, "Q5_0": 81, "Q6_K": 9},
    }
    assert result.quantization["float"] == 0
    assert result.quantization["dtype"] == "float32"
    assert 267_000_000 < result.parameters < 269_000_000
    assert result.size_bytes < 1.3 * result.source_size_bytes
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["quantization"]["model.layers.0.mlp.up_proj"] == {"group_size": 64, "bits": 4}


def test_the_gemma3_import_loads_and_continues_text(gemma3_4bit: ImportResult) -> None:
    from mlx_lm import load

    model, tokenizer = cast(tuple[Any, Any], load(str(gemma3_4bit.out_dir)))
    assert tokenizer.eos_token_ids == {1, 106}
    prompt = tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    tokens = _greedy(model, prompt, 6)
    assert "Paris" in tokenizer.decode(tokens)
