"""Grammar-constrained decoding: the reply must match a JSON schema or a tool-call format.

llguidance compiles a request's grammar once and, at every step, says which tokens may come
next. Its MLX helper needs Metal, so the mask is filled with its numpy helper here and applied
with `mx.where`, which works on the CPU, CUDA and Metal alike. Each constrained request has its
own `GrammarProcessor` among its logits processors, so it shares a running batch with
unconstrained requests: mlx-lm applies a request's processors to its own row only.

Runs on the engine thread; mlx is imported lazily, llguidance only by constrained requests.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from inference.schemas import GenerationParams, ToolSpec

if TYPE_CHECKING:
    import mlx.core as mx

logger = logging.getLogger(__name__)

# The format a forced tool call is written in (Hermes / Qwen style); inference.parsing reads it.
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Compact JSON: a constrained reply cannot wander off into endless whitespace.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """The request's schema or tools cannot be turned into a grammar; the message says why."""


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` whose objects with listed properties allow no others unless they say
    so, as OpenAI's strict mode has it. Without it llguidance lets a small model add made-up keys
    to a tool call's arguments until it runs out of tokens. Walks the schema without recursion."""
    copy: dict[str, Any] = json.loads(json.dumps(schema))
    stack: list[Any] = [copy]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return copy


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    parameters = closed(tool.parameters or {"type": "object"})
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _call_rule(tools: list[ToolSpec]) -> str:
    """The lark rule `call`: the JSON of a call of one of `tools`."""
    schemas = [_call_schema(t) for t in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = json.dumps(schema)
    return f'call: %json{{"x-guidance": {{"whitespace_flexible": false}}, "allOf": [{body}]}}\n'


# With tool_choice "auto": free text, or text and then calls. The free text is any text that
# never contains TOOL_CALL_START (llguidance's `&`/`~` on a lexeme), so the model writes freely
# until it starts a call; `before` (lazy: it ends at the first TOOL_CALL_START) is that text with
# the call's opening, after which the call must match the tools' schemas and may be followed only
# by more calls. Both lexemes run side by side from the start, so no lexeme has to be split.
_AUTO_LARK = (
    "start: TEXT | before call END more*\n"
    "more: SEP call END\n"
    "before[lazy]: /(.|\\n)*{start}\\n/\n"
    "TEXT: /(.|\\n)*/ & ~/(.|\\n)*{start}(.|\\n)*/\n"
    "END: {end}\n"
    "SEP: {sep}\n"
)


def _auto_lark(tools: list[ToolSpec]) -> str:
    start = TOOL_CALL_START.replace("/", "\\/")
    return _AUTO_LARK.format(
        start=start,
        end=json.dumps("\n" + TOOL_CALL_END),
        sep=json.dumps("\n" + TOOL_CALL_START + "\n"),
    ) + _call_rule(tools)


def grammar_for(params: GenerationParams) -> str | None:
    """The llguidance grammar a request's reply must follow, or None when it is free.

    A forced tool call wins over a response format: the reply is then one
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` naming the chosen tool (any of
    `tools` for "required"). With tool_choice "auto" and no response format the text is free,
    but a call, once the model opens one, must name one of `tools` with valid arguments.
    """
    forced = params.forced_tool
    fmt = params.response_format
    free = fmt is None or fmt.type == "text"
    if forced is None and free and not params.uses_tools:
        return None  # free text: no grammar, and no need of llguidance
    from llguidance import LLMatcher

    try:
        if forced is not None:
            tools = [t for t in params.tools if not forced or t.name == forced]
            lark = (
                f"start: {json.dumps(TOOL_CALL_START + chr(10))} call "
                f"{json.dumps(chr(10) + TOOL_CALL_END)}\n"
            ) + _call_rule(tools)
            return LLMatcher.grammar_from_lark(lark)
        if free:
            return LLMatcher.grammar_from_lark(_auto_lark(list(params.tools)))
        assert fmt is not None
        wanted: dict[str, Any] = (
            {"type": "object"} if fmt.type == "json_object" else dict(fmt.json_schema or {})
        )
        if fmt.type == "json_schema" and fmt.strict:
            wanted = closed(wanted)
        return LLMatcher.grammar_from_json_schema(wanted, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"cannot build a grammar: {e}") from e


def constraint_tokenizer(hf_tokenizer: Any, *, vocab_size: int, eos_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (about a second: build it once)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids)


def new_matcher(tokenizer: Any, grammar: str) -> Any:
    """Compile `grammar` for one request; raises ConstraintError if it does not compile."""
    from llguidance import LLMatcher

    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"invalid grammar: {matcher.get_error()}")
    return matcher


class GrammarProcessor:
    """A logits processor that lets through only the tokens the grammar allows next.

    mlx-lm calls it once per step with the request's tokens so far (prompt included) and its
    row of logits; from the second call on, the last of those tokens is the one sampled after
    the previous call, which the matcher consumes before computing the next mask. It never
    raises (an exception would fail the whole batch step): if the matcher ever errs, only the
    end-of-sequence tokens stay allowed, so the request ends.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: list[int]) -> None:
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.mask = allocate_token_bitmask(1, vocab_size)
        self._np = np
        self._calls = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        np = self._np
        if self._calls and not self.matcher.is_error():
            self.matcher.consume_token(int(tokens[-1].item()))  # type: ignore[arg-type]
        self._calls += 1
        width = logits.shape[-1]
        if self.matcher.is_error():
            logger.warning("grammar matcher failed: %s", self.matcher.get_error())
            allowed = np.zeros(width, dtype=bool)
            allowed[[e for e in self.eos_ids if e < width]] = True
        else:
            fill_next_token_bitmask(self.matcher, self.mask)
            bits = np.unpackbits(self.mask.view(np.uint8), bitorder="little")
            allowed = bits[:width].astype(bool)
            if allowed.shape[0] < width:  # logits padded beyond the tokenizer's vocabulary
                allowed = np.pad(allowed, (0, width - allowed.shape[0]))
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
