"""Reasoning and tool calls split from reply text, whole and as it streams."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from inference.parsing import OutputFormat, OutputSplitter, parse_output

THINK = OutputFormat(reasoning="think", think_start="<think>", think_end="</think>")
HARMONY = OutputFormat(reasoning="harmony")


def _stream(splitter: OutputSplitter, text: str, size: int) -> list[tuple[str, str]]:
    pieces = []
    for i in range(0, len(text), size):
        pieces += splitter.feed(text[i : i + size])
    return pieces + splitter.flush()


def _joined(pieces: list[tuple[str, str]], channel: str) -> str:
    return "".join(text for ch, text in pieces if ch == channel)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_it_streams_think_text_as_reasoning_whatever_the_chunking(size: int) -> None:
    text = "<think>Paris is in France.</think>\n\nThe capital is Paris."
    splitter = OutputSplitter(THINK)
    pieces = _stream(splitter, text, size)
    assert _joined(pieces, "reasoning") == "Paris is in France."
    assert _joined(pieces, "content") == "\n\nThe capital is Paris."
    assert not any("<" in t for _, t in pieces)
    result = splitter.result()
    assert (result.reasoning, result.content) == ("Paris is in France.", "The capital is Paris.")


def test_a_reply_that_starts_inside_reasoning_needs_no_opening_tag() -> None:
    output = OutputFormat(
        reasoning="think", think_start="<think>", think_end="</think>", starts_in_reasoning=True
    )
    parsed = parse_output("hmm, France.</think>Paris.", output)
    assert (parsed.reasoning, parsed.content) == ("hmm, France.", "Paris.")


def test_a_model_without_reasoning_keeps_its_text_as_content() -> None:
    parsed = parse_output("  <think>not special</think> here ", OutputFormat())
    assert parsed.content == "  <think>not special</think> here "
    assert parsed.reasoning == ""


def test_it_holds_back_a_hermes_tool_call_and_parses_it() -> None:
    call_json = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = f"Let me look.\n<tool_call>\n{call_json}\n</tool_call>"
    splitter = OutputSplitter(OutputFormat(), tools_enabled=True)
    pieces = _stream(splitter, text, 3)
    assert _joined(pieces, "content") == "Let me look.\n"
    result = splitter.result()
    assert result.content == "Let me look."
    [call] = result.tool_calls
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["id"].startswith("call_")


def test_it_parses_several_calls_and_gives_each_its_own_id() -> None:
    one = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    two = '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    parsed = parse_output(one + "\n" + two, OutputFormat(), tools_enabled=True)
    assert [c["name"] for c in parsed.tool_calls] == ["a", "b"]
    assert len({c["id"] for c in parsed.tool_calls}) == 2


def test_markup_that_is_not_a_call_comes_out_as_content() -> None:
    text = "See <tool_call>not json</tool_call> here"
    splitter = OutputSplitter(OutputFormat(), tools_enabled=True)
    pieces = _stream(splitter, text, 4)
    assert _joined(pieces, "content") == text
    assert splitter.result().tool_calls == []


def test_an_unfinished_call_at_the_end_is_still_read() -> None:
    parsed = parse_output(
        '<tool_call>{"name": "f", "arguments": {"q": 1}}', OutputFormat(), tools_enabled=True
    )
    assert [c["name"] for c in parsed.tool_calls] == ["f"]


def test_without_tools_tool_markup_is_plain_content() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    parsed = parse_output(text, OutputFormat(), tools_enabled=False)
    assert parsed.content == text
    assert parsed.tool_calls == []


def test_it_uses_the_model_familys_mlx_lm_parser() -> None:
    output = OutputFormat(tool_parser="mistral", tool_call_start="[TOOL_CALLS]", tool_call_end="")
    text = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
    parsed = parse_output(text, output, tools_enabled=True)
    assert parsed.content == "Sure."
    [call] = parsed.tool_calls
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}


def test_reasoning_and_a_tool_call_together() -> None:
    text = '<think>need weather</think><tool_call>{"name": "w", "arguments": {}}</tool_call>'
    parsed = parse_output(text, THINK, tools_enabled=True)
    assert parsed.reasoning == "need weather"
    assert parsed.content == ""
    assert [c["name"] for c in parsed.tool_calls] == ["w"]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_it_splits_harmony_channels(size: int) -> None:
    text = (
        "<|channel|>analysis<|message|>User wants a capital.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>"
    )
    splitter = OutputSplitter(HARMONY)
    pieces = _stream(splitter, text, size)
    assert _joined(pieces, "reasoning") == "User wants a capital."
    assert _joined(pieces, "content") == "Paris."


def test_it_reads_a_harmony_function_call() -> None:
    text = (
        "<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
    )
    parsed = parse_output(text, HARMONY, tools_enabled=True)
    assert parsed.reasoning == "Call it."
    assert parsed.tool_calls[0]["name"] == "get_weather"
    assert json.loads(parsed.tool_calls[0]["arguments"]) == {"city": "Paris"}


def test_it_reads_the_format_from_an_mlx_lm_tokenizer_wrapper() -> None:
    from mlx_lm.tool_parsers import json_tools

    tokenizer = SimpleNamespace(
        chat_template="{{ messages }}",
        has_thinking=True,
        think_start="<think>",
        think_end="</think>",
        tool_parser=json_tools.parse_tool_call,
        tool_call_start="<tool_call>",
        tool_call_end="</tool_call>",
    )
    output = OutputFormat.for_tokenizer(tokenizer)
    assert output.reasoning == "think"
    assert output.tool_parser == "json_tools"
    harmony = SimpleNamespace(chat_template="<|channel|>x<|message|>", has_thinking=False)
    assert OutputFormat.for_tokenizer(harmony).reasoning == "harmony"
