"""One forward pass for sequences at different places: a batch decoding in mlx-lm's
BatchGenerator and prompt chunks prefilling on caches of their own.

The engine's scheduler prefills long prompts in chunks between decode steps (inference.engine).
Run as passes of their own, every chunk reads all of the model's weights once more and pays a
pass's fixed costs again: on the 2-core CPU, SmolLM2 in float32 with two decode rows and a
16-token chunk took 163 ms as two passes and 142 ms as one. Here the chunks ride along in the
decode step's pass: each group of rows ("segment") goes through attention on its own cache
with its own mask, and everything else (norms, MLP, the final norm) runs once over all of their
tokens, reading the weights once. Only the last position of each segment reaches the output
head.

mlx-lm's BatchGenerator calls its model for each step; the engine hands it a `RidingModel`,
which runs the plain model unless the engine has set riders for the next call.

Only architectures whose blocks are exactly `h = x + self_attn(input_layernorm(x), mask, cache);
out = h + mlp(post_attention_layernorm(h))` with full attention (mlx-lm's llama, mistral, qwen2,
qwen3) are fused; others keep separate passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def fusable(model: Any) -> bool:
    """Whether `model` is one whose passes can be fused (see the module's docstring)."""
    args = getattr(model, "args", None)
    inner = getattr(model, "model", None)
    if getattr(args, "model_type", None) not in FUSED_MODEL_TYPES or inner is None:
        return False
    if getattr(inner, "swa_idx", None) is not None:
        return False  # sliding-window layers need masks of their own
    layers = getattr(inner, "layers", None)
    if not layers or not all(hasattr(inner, a) for a in ("embed_tokens", "norm")):
        return False
    if not getattr(args, "tie_word_embeddings", False) and not hasattr(model, "lm_head"):
        return False
    return all(all(hasattr(layer, part) for part in _BLOCK_PARTS) for layer in layers)


def forward(model: Any, segments: list[tuple[Any, list[Any], int]]) -> list[Any]:
    """Run every (tokens (B, L), per-layer cache, position) segment through `model` in one
    pass; for each, the logits at its `position` (-1: the last), (B, vocab). The caches are
    updated as the model's own call would update them."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    hidden = [inner.embed_tokens(tokens) for tokens, _, _ in segments]
    masks = [
        create_attention_mask(h, cache[0])
        for h, (_, cache, _) in zip(hidden, segments, strict=True)
    ]
    if len(segments) == 1:
        # One segment (a prompt's own pass): the blocks as the model runs them, and only the
        # picked position through the output head (the model's own call projects every one).
        (h,), (mask,), (_, cache, position) = hidden, masks, segments[0]
        for layer, layer_cache in zip(inner.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        return [_head(model, h[:, position, :])]
    shapes = [h.shape for h in hidden]
    sizes = [b * n for b, n, _ in shapes]
    cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    width = shapes[0][-1]
    for i, layer in enumerate(inner.layers):
        attended = [
            h + layer.self_attn(layer.input_layernorm(h), mask, cache[i])
            for h, mask, (_, cache, _) in zip(hidden, masks, segments, strict=True)
        ]
        flat = mx.concatenate([h.reshape(-1, width) for h in attended], axis=0)
        flat = flat + layer.mlp(layer.post_attention_layernorm(flat))
        hidden = [
            part.reshape(shape)
            for part, shape in zip(mx.split(flat, cuts, axis=0), shapes, strict=True)
        ]
    picked = [h[:, position, :] for h, (_, _, position) in zip(hidden, segments, strict=True)]
    logits = _head(model, mx.concatenate(picked, axis=0))
    rows = [b for b, _, _ in shapes]
    row_cuts = [sum(rows[: i + 1]) for i in range(len(rows) - 1)]
    return list(mx.split(logits, row_cuts, axis=0))


def _head(model: Any, hidden: Any) -> Any:
    """The final norm and the output head over (rows, width) hidden states."""
    out = model.model.norm(hidden)
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear(out)
    return model.lm_head(out)


@dataclass
class Rider:
    """A prompt chunk for the next decode pass: its tokens (rows, n), its cache, the position of
    its last prompt token (padding may follow) and, once the pass ran, the logits there."""

    tokens: Any
    cache: list[Any]
    position: int
    logits: Any = field(default=None, repr=False)


class RidingModel:
    """A model for mlx-lm's BatchGenerator that carries the engine's prompt chunks (`riders`)
    in the first model call after they are set, and is the plain model otherwise."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.riders: list[Rider] = []

    def __call__(self, inputs: Any, cache: Any = None, **kwargs: Any) -> Any:
        pending = [r for r in self.riders if r.logits is None]
        if not pending or cache is None or kwargs:
            return self.model(inputs, cache=cache, **kwargs)
        segments = [(inputs, cache, -1)] + [(r.tokens, r.cache, r.position) for r in pending]
        outputs = forward(self.model, segments)
        for rider, logits in zip(pending, outputs[1:], strict=True):
            rider.logits = logits
        # The caller reads the last position of each row: (B, 1, vocab) is what it needs.
        return outputs[0][:, None, :]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
