"""Sentence embeddings on MLX: a BERT encoder in `mlx.nn` with sentence-transformers' pooling.

mlx-lm implements only generative models, and the maintained MLX embeddings package
(`mlx-embeddings`) pulls in mlx-vlm with its audio, vision and web-server dependencies, so the
encoder is written here: BERT is small (embeddings, N post-norm blocks of attention and a GELU
MLP). The model folder is what sentence-transformers saves (`config.json`,
`model.safetensors`, `tokenizer.json`, `modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`); how the token states become one vector (mean, CLS or max pooling,
then L2 normalization or not) and the maximum length are read from those files
(`inference.weights.sentence`), not assumed.

Like everything that evaluates MLX, an embedder is loaded and run on the engine thread only.
Plain Python otherwise: no Django, no settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from inference.weights.sentence import (
    BERT_ACTIVATIONS,
    BertConfig,
    SentenceModelError,
    SentencePipeline,
    read_pipeline,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# sentence-transformers' default `encode` batch size.
DEFAULT_BATCH_SIZE = 32
_ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu}
assert set(_ACTIVATIONS) == set(BERT_ACTIVATIONS)


class _Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])
        # One segment: every token has type 0, as for a single sentence.
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.norm(x)


class _Layer(nn.Module):
    """One post-norm encoder block: self-attention, then the feed-forward network."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, hidden = x.shape
        head_dim = hidden // self.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.heads, head_dim).transpose(0, 2, 1, 3)

        attended = mx.fast.scaled_dot_product_attention(
            split(self.query(x)),
            split(self.key(x)),
            split(self.value(x)),
            scale=head_dim**-0.5,
            mask=mask,
        )
        attended = attended.transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = self.attention_norm(x + self.attention_out(attended))
        return self.output_norm(x + self.output(self.activation(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT without its pooler: token ids and attention mask in, the last hidden states out."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.layers = [_Layer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        # Padding is never attended to: (batch, 1, 1, keys), broadcast over heads and queries.
        mask = attention_mask.astype(mx.bool_)[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# Hugging Face's BERT parameter names -> this module's.
_RENAMES = (
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.", "layers."),
    (".attention.self.", "."),
    (".attention.output.dense.", ".attention_out."),
    (".attention.output.LayerNorm.", ".attention_norm."),
    (".intermediate.dense.", ".intermediate."),
    (".output.dense.", ".output."),
    (".output.LayerNorm.", ".output_norm."),
)
# In the checkpoint but not used by sentence-transformers' pipeline.
_UNUSED = ("pooler.", "embeddings.position_ids", "cls.")


def bert_weights(raw: dict[str, mx.array]) -> dict[str, mx.array]:
    """The checkpoint's tensors under this module's names (a `bert.` prefix is dropped)."""
    weights: dict[str, mx.array] = {}
    for name, value in raw.items():
        name = name.removeprefix("bert.")
        if name.startswith(_UNUSED):
            continue
        for old, new in _RENAMES:
            name = name.replace(old, new)
        weights[name] = value
    return weights


def _tokenizer(path: Path, max_length: int) -> Tokenizer:
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        settings: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            settings = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        lowercase = bool(settings.get("do_lower_case", True))
        tokenizer = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lowercase)._tokenizer
    else:
        raise SentenceModelError(f"no tokenizer.json or vocab.txt in {path}")
    # The file may carry its own padding and truncation (this model's: pad to 128, cut at 128);
    # the pipeline's max_seq_length decides instead, and batches are padded here.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


@dataclass(frozen=True)
class Embedded:
    """Vectors in input order (float32, one row per text) and the tokens they took."""

    vectors: np.ndarray
    prompt_tokens: int


class SentenceEmbedder:
    """A sentence-transformers model on MLX: tokenize, encode, pool, normalize.

    `embed` computes whole requests; `encode`, `plan` and `run` let the engine compute one batch
    between generation steps.
    """

    def __init__(
        self,
        model: BertEncoder,
        tokenizer: Tokenizer,
        pipeline: SentencePipeline,
        max_length: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.max_length = max_length
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = pad if pad is not None else 0

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, with [CLS] and [SEP], cut at `max_length` tokens."""
        if self.pipeline.lowercase:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    @staticmethod
    def plan(encoded: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
        """Batches of input indices, longest first, so each batch pads little."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        return [order[i : i + batch_size] for i in range(0, len(order), max(1, batch_size))]

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """The sentence vectors of one batch of token ids (float32, one row each)."""
        length = max(len(ids) for ids in batch)
        ids = np.full((len(batch), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(batch), length), dtype=np.int32)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        attention = mx.array(mask)
        states = self.model(mx.array(ids), attention)
        pooled = _pool(states, attention, self.pipeline.pooling)
        if self.pipeline.normalize:
            # torch.nn.functional.normalize, as sentence-transformers' Normalize module does.
            norms = mx.sqrt(mx.sum(pooled * pooled, axis=-1, keepdims=True))
            pooled = pooled / mx.maximum(norms, 1e-12)
        result = pooled.astype(mx.float32)
        mx.eval(result)
        return np.array(result, copy=True)

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> Embedded:
        """The vectors of `texts`, in order, computed `batch_size` texts at a time."""
        encoded = self.encode(texts)
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for indices in self.plan(encoded, batch_size):
            vectors[indices] = self.run([encoded[i] for i in indices])
        return Embedded(vectors=vectors, prompt_tokens=sum(len(ids) for ids in encoded))


def _pool(states: mx.array, attention: mx.array, pooling: str) -> mx.array:
    """sentence-transformers' Pooling over the real (unpadded) tokens."""
    if pooling == "cls":
        return states[:, 0]
    weights = attention[..., None].astype(states.dtype)
    if pooling == "max":
        return mx.max(mx.where(weights > 0, states, -1e9), axis=1)
    counts = mx.maximum(mx.sum(weights, axis=1), 1e-9)
    return mx.sum(states * weights, axis=1) / counts


def load_sentence_embedder(path: Path, *, max_length: int | None = None) -> SentenceEmbedder:
    """The sentence-transformers model in the folder `path`.

    `max_length` caps the folder's own `max_seq_length` (and both are capped by the model's
    position table). Raises SentenceModelError for a folder this module cannot run, OSError for
    files that cannot be read.
    """
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise SentenceModelError(f"config.json is unreadable: {e}") from e
    if not isinstance(config, dict):
        raise SentenceModelError("config.json is not an object")
    bert = BertConfig.from_dict(config)
    pipeline = read_pipeline(path)
    limits = [bert.max_position_embeddings, pipeline.max_seq_length, max_length]
    length = min(n for n in limits if n is not None)

    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise SentenceModelError(f"no safetensors weights in {path}")
    raw: dict[str, mx.array] = {}
    for file in weight_files:
        raw.update(mx.load(str(file)))  # type: ignore[arg-type]
    model = BertEncoder(bert)
    try:
        model.load_weights(list(bert_weights(raw).items()), strict=True)
    except ValueError as e:
        raise SentenceModelError(f"the weights do not fit a BERT encoder: {e}") from e
    model.set_dtype(mx.float32)
    model.eval()
    mx.eval(model.parameters())
    return SentenceEmbedder(model, _tokenizer(path, length), pipeline, length)
