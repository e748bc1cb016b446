from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django import template
from django.utils.safestring import SafeString

from chat.markdown import render_markdown, split_reasoning
from inference.models import Generation

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> SafeString:
    """Render model output as safe HTML (raw HTML off, links made safe, code highlighted)."""
    return render_markdown(text or "")


@register.filter(name="live_parts")
def live_parts(text: str) -> dict[str, str]:
    """A streaming reply's raw text as {"reasoning", "answer"} (see split_reasoning)."""
    reasoning, answer = split_reasoning(text or "")
    return {"reasoning": reasoning, "answer": answer}


def _thinking_summary(g: Generation, reasoning: str, answer: str) -> str:
    """The Thinking section's title, "Thought for about 4 s · 120 words": the time is the
    decode time's share of the reasoning (by characters), as the row keeps no timestamp for
    the end of the reasoning."""
    words = len(reasoning.split())
    length = f"{words} word{'' if words == 1 else 's'}"
    if g.first_token_at is None or g.finished_at is None:
        return f"Thinking · {length}"
    seconds = (g.finished_at - g.first_token_at).total_seconds()
    seconds *= len(reasoning) / max(1, len(reasoning) + len(answer))
    if seconds < 1:
        return f"Thought for under a second · {length}"
    return f"Thought for about {seconds:.0f} s · {length}"


@register.simple_tag
def reply_parts(g: Generation) -> dict[str, Any]:
    """A finished reply's {"reasoning", "answer", "summary"}: the worker's split when it made
    one, else (a reply from before the split, or one the worker never finished) the raw text
    split the way the live view splits it."""
    if g.content or g.reasoning or g.tool_calls:
        reasoning, answer = g.reasoning, g.content
    else:
        reasoning, answer = split_reasoning(g.text)
    summary = _thinking_summary(g, reasoning, answer) if reasoning else ""
    return {"reasoning": reasoning, "answer": answer, "summary": summary}


@register.simple_tag
def model_notice(conversation: Any, models: Iterable[dict[str, Any]]) -> str:
    """Why the conversation's model cannot answer now ("" if it can): it was removed from the
    catalogue, or it is listed but unavailable."""
    if conversation is None or not conversation.model_id:
        return ""
    for choice in models:
        if choice["id"] == conversation.model_id:
            if choice["available"]:
                return ""
            return (
                f"This conversation's model, {choice['name']}, is unavailable: "
                f"{choice['reason']}. Pick another model below to go on."
            )
    return (
        f"This conversation's model, {conversation.model_id}, is no longer on this server. "
        "Pick another model below to go on."
    )
