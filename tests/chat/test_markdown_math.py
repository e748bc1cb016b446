"""The reply renderer's math, task lists, tables and escaping, and the reasoning split the
live view and the final render use (chat.markdown, chat.templatetags.chat_tags)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from chat.markdown import render_markdown, split_reasoning
from chat.templatetags.chat_tags import live_parts, reply_parts
from inference.models import Generation


def test_it_marks_inline_math_for_katex() -> None:
    html = render_markdown(r"Euler: $e^{i\pi}+1=0$.")

    assert html == '<p>Euler: <span class="math math-inline">e^{i\\pi}+1=0</span>.</p>\n'


def test_it_marks_display_math_blocks_and_inline_double_dollars() -> None:
    block = render_markdown("Area:\n\n$$\n\\int_0^1 x\\,dx\n$$\n\nDone")
    one_line = render_markdown("$$a^2+b^2=c^2$$")
    inline = render_markdown("so $$x^2$$ here")

    assert '<div class="math math-display">\\int_0^1 x\\,dx</div>' in block
    assert "<p>Done</p>" in block
    assert one_line == '<div class="math math-display">a^2+b^2=c^2</div>\n'
    assert '<p>so <span class="math math-display">x^2</span> here</p>' in inline


def test_it_marks_latex_bracket_math_too() -> None:
    html = render_markdown(r"So \(x^2\) and \[\frac{1}{2}\] but \(not closed")

    assert '<span class="math math-inline">x^2</span>' in html
    assert '<span class="math math-display">\\frac{1}{2}</span>' in html
    assert "but (not closed" in html  # an escaped parenthesis, as markdown reads it


@pytest.mark.parametrize(
    "text",
    [
        "It costs $5 and $6 tomorrow.",  # a closing dollar before a digit is a price
        "between $ 3 and 4$",  # space after the opening dollar
        "a lone $ sign",
        "an escaped \\$x$ dollar",
        "`$code$` in backticks",
    ],
)
def test_it_leaves_dollars_that_are_not_math_alone(text: str) -> None:
    assert "math" not in render_markdown(text)


def test_it_leaves_an_unclosed_display_block_as_text_while_it_streams() -> None:
    html = render_markdown("$$\n\\frac{1}{2")

    assert "math" not in html
    assert "$$" in html


def test_it_escapes_markup_inside_math() -> None:
    html = render_markdown("$<script>alert(1)</script>$ and $$<img src=x onerror=y>$$")

    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_it_renders_task_lists_with_disabled_checkboxes() -> None:
    html = render_markdown("- [ ] write tests\n- [x] ship *it*\n- plain item\n")

    assert '<ul class="contains-task-list">' in html
    assert html.count('class="task-list-item"') == 2
    assert (
        '<input type="checkbox" class="task-list-item-checkbox" disabled aria-label="Not done">'
        " write tests" in html
    )
    assert 'disabled checked aria-label="Done"> ship <em>it</em>' in html
    assert "<li>plain item</li>" in html


def test_it_renders_tables_with_alignment_classes_not_styles() -> None:
    html = render_markdown("| a | b | c |\n|:-|:-:|-:|\n| 1 | 2 | 3 |\n")

    assert '<td class="align-left">1</td>' in html
    assert '<td class="align-center">2</td>' in html
    assert '<td class="align-right">3</td>' in html
    assert "style=" not in html


def test_it_still_escapes_raw_html_and_refuses_script_links() -> None:
    html = render_markdown('<b onclick="x()">hi</b> [link](javascript:alert(1))')

    assert "<b" not in html and "&lt;b onclick" in html
    assert 'href="javascript' not in html


def test_it_splits_think_blocks_from_the_answer() -> None:
    assert split_reasoning("<think>Let me see.\nOK</think>\n\nParis.") == (
        "Let me see.\nOK",
        "Paris.",
    )
    # The template opened the block in the prompt: the text only closes it.
    assert split_reasoning("Hmm, France.</think>Paris.") == ("Hmm, France.", "Paris.")
    # Mid-stream, still thinking: all of it is reasoning so far.
    assert split_reasoning("<think>Still going") == ("Still going", "")


def test_it_splits_the_harmony_analysis_channel() -> None:
    text = (
        "<|channel|>analysis<|message|>The user asks for a capital.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris."
    )

    assert split_reasoning(text) == ("The user asks for a capital.", "Paris.")


def test_it_leaves_plain_text_whole() -> None:
    assert split_reasoning("Just $x$ and <b>") == ("", "Just $x$ and <b>")
    assert live_parts("plain") == {"reasoning": "", "answer": "plain"}


@pytest.mark.django_db
def test_it_uses_the_workers_split_and_summarizes_the_thinking() -> None:
    start = timezone.now()
    g = Generation.objects.create(
        model_id="m",
        state=Generation.State.COMPLETE,
        text="<think>one two three four</think>Answer here",
        reasoning="one two three four",
        content="Answer here",
        first_token_at=start,
        finished_at=start + timedelta(seconds=60),
    )

    parts = reply_parts(g)

    assert parts["reasoning"] == "one two three four"
    assert parts["answer"] == "Answer here"
    # 18 of the 29 characters were reasoning: that share of the minute of decoding.
    assert parts["summary"] == "Thought for about 37 s · 4 words"


@pytest.mark.django_db
def test_it_splits_a_reply_the_worker_never_finished_from_its_raw_text() -> None:
    g = Generation.objects.create(
        model_id="m", state=Generation.State.INTERRUPTED, text="<think>hmm</think>Half an ans"
    )

    parts = reply_parts(g)

    assert (parts["reasoning"], parts["answer"]) == ("hmm", "Half an ans")
    assert parts["summary"] == "Thinking · 1 word"
