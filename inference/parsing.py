"""What a reply's raw text means: answer, reasoning and tool calls.

Plain Python, run by the worker. A model writes its reasoning between `<think>` and `</think>`
(or, GPT-OSS, in the harmony format's "analysis" channel) and its tool calls in its family's
markup: mlx-lm's tool parsers read the families they know, and the Hermes / Qwen
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` form is always understood (it is
what the forced-call grammar writes). `OutputSplitter` splits text as it streams: each piece is
"content" or "reasoning", and tool-call markup is held back; `parse_output` is the same split
over a whole reply.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

CONTENT = "content"
REASONING = "reasoning"
HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"
HARMONY_MARKERS = (
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|start|>",
    "<|call|>",
    "<|return|>",
    "<|constrain|>",
)


@dataclass(frozen=True)
class OutputFormat:
    """How one model marks reasoning and tool calls (plain values: it crosses threads)."""

    reasoning: str = ""  # "", "think" or "harmony"
    think_start: str = ""
    think_end: str = ""
    starts_in_reasoning: bool = False  # the prompt ends with an open think block
    tool_parser: str = ""  # a module of mlx_lm.tool_parsers, "" for none
    tool_call_start: str = ""
    tool_call_end: str = ""

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> OutputFormat:
        """The format an mlx-lm TokenizerWrapper's model writes in."""
        template = getattr(tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else ""
        values: dict[str, Any] = {}
        if "<|channel|>" in template and "<|message|>" in template:
            values["reasoning"] = "harmony"
        elif getattr(tokenizer, "has_thinking", False):
            values["reasoning"] = "think"
            values["think_start"] = str(tokenizer.think_start)
            values["think_end"] = str(tokenizer.think_end)
        parser = getattr(tokenizer, "tool_parser", None)
        start = getattr(tokenizer, "tool_call_start", None)
        if parser is not None and start:
            values["tool_parser"] = str(parser.__module__).rsplit(".", 1)[-1]
            values["tool_call_start"] = str(start)
            values["tool_call_end"] = str(getattr(tokenizer, "tool_call_end", "") or "")
        return cls(**values)


@dataclass
class ParsedOutput:
    """A whole reply: its answer, its reasoning and its tool calls ({"id","name","arguments"})."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _normalize_calls(parsed: Any) -> list[dict[str, str]]:
    """mlx-lm parsers return a dict or a list of dicts with "name" and "arguments"."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("not a tool call")
        arguments = item.get("arguments", item.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": new_call_id(), "name": item["name"], "arguments": arguments})
    return calls


def parse_tool_body(body: str, parser: str, tools: list[dict[str, Any]] | None) -> list[dict]:
    """The calls in the text between a tool-call start and end marker; ValueError if none."""
    if parser and parser != "json_tools":
        import importlib

        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
        try:
            return _normalize_calls(module.parse_tool_call(body, tools))
        except Exception as e:
            raise ValueError(f"unparseable tool call: {e}") from e
    try:
        return _normalize_calls(json.loads(body.strip()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"unparseable tool call: {e}") from e


def _partial_marker_length(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that begins some marker."""
    longest = min(len(text), max((len(m) for m in markers), default=1) - 1)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) for m in markers):
            return n
    return 0


class OutputSplitter:
    """Splits reply text as it streams into ("content" | "reasoning", text) pieces.

    Text that may be the start of a marker is held until the next piece shows what it is.
    Tool-call markup is never emitted when tools are on: a finished call goes to
    `tool_calls`, and markup that turns out not to be a call is emitted as content after all.
    """

    def __init__(
        self,
        output: OutputFormat,
        *,
        tools_enabled: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        self.output = output
        self.tools = tools
        self.harmony = output.reasoning == "harmony"
        self.channel = REASONING if output.starts_in_reasoning else CONTENT
        self.buffer = ""
        self.tool_markers: list[tuple[str, str, str]] = []  # (start, end, parser)
        if tools_enabled and not self.harmony:
            if output.tool_call_start:
                self.tool_markers.append(
                    (output.tool_call_start, output.tool_call_end, output.tool_parser)
                )
            if output.tool_call_start != HERMES_START:
                self.tool_markers.append((HERMES_START, HERMES_END, ""))
        self.tools_enabled = tools_enabled
        self.in_tool: tuple[str, str, str] | None = None
        self.tool_body = ""
        # Harmony: inside a header (between <|start|>/<|channel|> and <|message|>)?
        self.header: str | None = None
        self.harmony_tool: str | None = None  # the function a commentary message calls
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, str]] = []

    # --- public ------------------------------------------------------------------------

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        return self._drain(final=False)

    def flush(self) -> list[tuple[str, str]]:
        """The end of the reply: release what was held, settle an unfinished tool call."""
        pieces = self._drain(final=True)
        if self.in_tool is not None:
            start, _, parser = self.in_tool
            body, self.in_tool, self.tool_body = self.tool_body, None, ""
            pieces += self._settle_tool(start, body, "", parser)
        if self.harmony_tool is not None and self.tool_body:
            self._harmony_call()
        return [p for p in pieces if p[1]]

    def result(self) -> ParsedOutput:
        content = "".join(self.content)
        reasoning = "".join(self.reasoning).strip()
        if reasoning or self.tool_calls:
            # The blank lines that separated what was split off are no part of the answer.
            content = content.strip()
        return ParsedOutput(content=content, reasoning=reasoning, tool_calls=list(self.tool_calls))

    # --- splitting ---------------------------------------------------------------------

    def _emit(self, pieces: list[tuple[str, str]], channel: str, text: str) -> None:
        if not text:
            return
        (self.reasoning if channel == REASONING else self.content).append(text)
        if pieces and pieces[-1][0] == channel:
            pieces[-1] = (channel, pieces[-1][1] + text)
        else:
            pieces.append((channel, text))

    def _markers(self) -> list[str]:
        if self.harmony:
            return list(HARMONY_MARKERS)
        if self.in_tool is not None:
            return [self.in_tool[1]] if self.in_tool[1] else []
        markers = [start for start, _, _ in self.tool_markers]
        if self.output.reasoning == "think":
            markers.append(
                self.output.think_end if self.channel == REASONING else self.output.think_start
            )
        return [m for m in markers if m]

    def _drain(self, *, final: bool) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        while self.buffer:
            markers = self._markers()
            hits = [(self.buffer.find(m), -len(m), m) for m in markers if m in self.buffer]
            if not hits:
                keep = 0 if final else _partial_marker_length(self.buffer, markers)
                self._text(pieces, self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            index, _, marker = min(hits)
            self._text(pieces, self.buffer[:index])
            self.buffer = self.buffer[index + len(marker) :]
            self._marker(pieces, marker)
        return pieces

    def _text(self, pieces: list[tuple[str, str]], text: str) -> None:
        if not text:
            return
        if self.harmony and self.header is not None:
            self.header += text
        elif self.in_tool is not None or self.harmony_tool is not None:
            self.tool_body += text
        else:
            self._emit(pieces, self.channel, text)

    def _marker(self, pieces: list[tuple[str, str]], marker: str) -> None:
        if self.harmony:
            self._harmony_marker(marker)
            return
        if self.in_tool is not None:  # its end marker
            start, end, parser = self.in_tool
            body, self.in_tool, self.tool_body = self.tool_body, None, ""
            for channel, text in self._settle_tool(start, body, end, parser):
                self._emit(pieces, channel, text)
            return
        for start, end, parser in self.tool_markers:
            if marker == start:
                self.in_tool = (start, end, parser)
                self.tool_body = ""
                return
        if marker == self.output.think_start:
            self.channel = REASONING
        elif marker == self.output.think_end:
            self.channel = CONTENT

    def _settle_tool(self, start: str, body: str, end: str, parser: str) -> list[tuple[str, str]]:
        try:
            self.tool_calls += parse_tool_body(body, parser, self.tools)
            return []
        except ValueError:
            logger.info("text after %r is not a tool call; kept as content", start)
            return [(CONTENT, start + body + end)]

    # --- harmony -----------------------------------------------------------------------

    def _harmony_marker(self, marker: str) -> None:
        if marker in ("<|start|>", "<|channel|>"):
            if self.harmony_tool is not None and self.tool_body:
                self._harmony_call()
            self.header = "" if marker == "<|start|>" or self.header is None else self.header
            self.header += marker
        elif marker == "<|constrain|>":
            if self.header is not None:
                self.header += " "
        elif marker == "<|message|>":
            header = self.header or ""
            self.header = None
            channel = header.split("<|channel|>")[-1] if "<|channel|>" in header else ""
            words = channel.replace("<|start|>", " ").split()
            recipient = next((w[3:] for w in header.split() if w.startswith("to=")), "")
            if recipient.startswith("functions."):
                self.harmony_tool = recipient[len("functions.") :]
                self.tool_body = ""
            else:
                self.harmony_tool = None
                self.channel = REASONING if words and words[0] == "analysis" else CONTENT
        else:  # <|end|>, <|call|>, <|return|>: the message is over
            if self.harmony_tool is not None:
                self._harmony_call()
            self.channel = CONTENT

    def _harmony_call(self) -> None:
        name, body = self.harmony_tool or "", self.tool_body.strip()
        self.harmony_tool, self.tool_body = None, ""
        try:
            json.loads(body or "{}")
        except ValueError:
            logger.info("harmony call of %s has no JSON arguments", name)
        self.tool_calls.append({"id": new_call_id(), "name": name, "arguments": body or "{}"})


def parse_output(
    text: str,
    output: OutputFormat,
    *,
    tools_enabled: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> ParsedOutput:
    """Split a whole reply (see OutputSplitter)."""
    splitter = OutputSplitter(output, tools_enabled=tools_enabled, tools=tools)
    splitter.feed(text)
    splitter.flush()
    return splitter.result()
