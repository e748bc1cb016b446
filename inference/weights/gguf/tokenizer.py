"""A GGUF file's tokenizer as a `transformers` fast tokenizer, built with `tokenizers` alone.

Byte-level BPE (`tokenizer.ggml.model` gpt2) and SentencePiece BPE (llama), with llama.cpp's
pre-tokenizers and special tokens; Gemma files without a chat template get Gemma's.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.weights.gguf.reader import GGUFError, read_header

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Token types in `tokenizer.ggml.token_type` (gguf.TokenType).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_TOKEN_UNUSED = 5
_TOKEN_BYTE = 6

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` values (from llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Gemma's chat format, for Gemma files that carry no template (base models converted by
# llama.cpp often don't). Same turns as Google's template: a system message is folded into the
# first user turn and the model's role is called "model".
_GEMMA_END_OF_TURN = "<end_of_turn>"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def special_token_ids(metadata: dict[str, Any], architecture: str | None = None) -> dict[str, Any]:
    def get(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(value)

    eos = [i for i in (get("eos"), get("eot"), get("eom")) if i is not None]
    if (architecture or metadata.get("general.architecture")) == "gemma3":
        # Gemma ends a turn with <end_of_turn>, which the file does not mark as end of text:
        # llama.cpp finds it by name, and so does this.
        tokens = metadata.get("tokenizer.ggml.tokens") or []
        if _GEMMA_END_OF_TURN in tokens:
            eos.append(tokens.index(_GEMMA_END_OF_TURN))
    return {
        "bos": get("bos"),
        "eos": list(dict.fromkeys(eos)),
        "unk": get("unknown"),
        "pad": get("padding"),
    }


def build_tokenizer(metadata: dict[str, Any], path: Path | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer from `tokenizer.ggml.*` metadata: byte-level BPE or SentencePiece BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    where = f"{path.name}: " if path else ""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{where}the file has no tokenizer (tokenizer.ggml.tokens)")
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.ones(len(tokens), dtype=np.int32)
    # Some converters write a token twice; the first id wins, as in llama.cpp.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    ids = special_token_ids(metadata)

    def token_at(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token_at(ids["bos"])
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        pre_name = metadata.get("tokenizer.ggml.pre", "default")
        tokenizer = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=pre_name == "llama-bpe",
            )
        )
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre_name)
        if pre_name == "qwen2":
            tokenizer.normalizer = normalizers.NFC()
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError(f"{where}a SentencePiece tokenizer without tokenizer.ggml.scores")
        tokenizer = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_spm_merges(vocab, tokens, scores, types),
                unk_token=token_at(ids["unk"]),
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        spm_decoders = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if metadata.get("tokenizer.ggml.add_space_prefix", True):
            tokenizer.normalizer = normalizers.Sequence(
                [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
            )
            spm_decoders.append(decoders.Strip(" ", 1, 0))
        else:
            # Gemma: no dummy prefix, so a leading space is real and decoding keeps it.
            tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.decoder = decoders.Sequence(spm_decoders)
    else:
        raise GGUFError(f"{where}tokenizer model {kind!r} is not supported (gpt2 or llama)")

    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, vocab[bos])],
        )
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind_id in zip(tokens, types, strict=False)
            if kind_id == _TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_id in zip(tokens, types, strict=False)
            if kind_id == _TOKEN_USER_DEFINED
        ]
    )
    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is None and {"<start_of_turn>", _GEMMA_END_OF_TURN} <= vocab.keys():
        chat_template = GEMMA_CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token_at(ids["eos"][0] if ids["eos"] else None),
        unk_token=token_at(ids["unk"]),
        pad_token=token_at(ids["pad"]),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context is not None else None,
    )


def _byte_level_pre_tokenizer(pre_name: str) -> Any:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pre

    if pre_name in ("llama-bpe", "qwen2"):
        split = _LLAMA3_SPLIT if pre_name == "llama-bpe" else _QWEN2_SPLIT
        return pre.Sequence(
            [
                pre.Split(Regex(split), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_name == "smollm":
        # llama.cpp's smollm pre-tokenizer splits digits one by one before the GPT-2 regex.
        return pre.Sequence([pre.Digits(individual_digits=True), byte_level])
    if pre_name not in ("default", "gpt2", "gpt-2"):
        logger.warning("unknown GGUF pre-tokenizer %r: using GPT-2's", pre_name)
    return byte_level


def _spm_merges(
    vocab: dict[str, int], tokens: list[str], scores: np.ndarray, types: Any = None
) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's score-ordered merging (as transformers does).

    Control, unused and byte tokens are never the result of a merge: SentencePiece does not
    produce them from text (Gemma's `<unused0>`... pieces score higher than every real word).
    """
    skip = {_TOKEN_CONTROL, _TOKEN_UNUSED, _TOKEN_BYTE}
    kinds = [1] * len(tokens) if types is None else [int(t) for t in types]
    ranks = [-float(x) for x in scores]
    get = vocab.get
    pairs: list[tuple[str, str]] = []
    keys: list[tuple[float, int, int]] = []
    for i, piece in enumerate(tokens):
        if len(piece) < 2 or kinds[i] in skip or get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left = get(piece[:cut])
            if left is None:
                continue
            right = get(piece[cut:])
            if right is not None:
                pairs.append((piece[:cut], piece[cut:]))
                keys.append((ranks[i], left, right))
    # Highest score first, ties by the ids of the two halves (a 262k-token vocabulary makes
    # half a million merges: sort indices, not tuples of strings).
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [pairs[i] for i in order]


def read_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Only the tokenizer of a GGUF file (no tensor data is read)."""
    header = read_header(Path(path))
    return build_tokenizer(header.metadata, Path(path))


def detokenizer_class(tokenizer: PreTrainedTokenizerFast) -> Any:
    """The streaming detokenizer mlx_lm.load would pick for this tokenizer's decoder."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    if decoder.get("type") == "ByteLevel":
        return BPEStreamingDetokenizer
    if not any(d.get("type") == "Strip" for d in decoder.get("decoders", [])):
        return functools.partial(SPMStreamingDetokenizer, trim_space=False)
    return SPMStreamingDetokenizer
