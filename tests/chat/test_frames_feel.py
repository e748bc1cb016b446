"""Frames and page parts for reading replies: deltas go to the answer or to the Thinking
section, a snapshot re-splits the raw text, and the picker and thread say why a model is
unavailable (chat.frames, chat.templatetags.chat_tags)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from chat.frames import delta_frame, model_choices, snapshot_frame
from chat.templatetags.chat_tags import model_notice
from inference.catalogue import ModelSpec


def test_it_appends_answer_deltas_to_the_live_text() -> None:
    html = delta_frame(code="abc", text="Hello <b>")

    assert html == '<div hx-swap-oob="beforeend:#reply-abc-text">Hello &lt;b&gt;</div>'


def test_it_appends_reasoning_deltas_to_the_thinking_section() -> None:
    html = delta_frame(code="abc", text="Let me think", channel="reasoning")

    assert html == '<div hx-swap-oob="beforeend:#reply-abc-reasoning">Let me think</div>'


def test_it_splits_and_renders_a_snapshot_of_the_raw_text() -> None:
    html = snapshot_frame(code="abc", text="<think>Step *one*</think>The **answer**: $x^2$")

    assert 'id="reply-abc-live" class="live" hx-swap-oob="true"' in html
    assert '<div id="reply-abc-reasoning" class="stream-source">Step *one*</div>' in html
    assert "<em>one</em>" in html  # the reasoning, rendered
    assert '<div id="reply-abc-text" class="stream-source">The **answer**: $x^2$</div>' in html
    assert "<strong>answer</strong>" in html
    assert '<span class="math math-inline">x^2</span>' in html
    assert "&lt;think&gt;" not in html and "<think>" not in html
    assert "hidden" not in html.split("<summary>")[0]  # the Thinking section shows


def test_it_hides_the_thinking_section_of_a_reply_without_reasoning() -> None:
    html = snapshot_frame(code="abc", text="No reasoning here")

    assert '<details class="thinking live-thinking" open hidden>' in html


def test_it_says_why_a_model_is_unavailable(models_root: Path) -> None:
    choices = {c["id"]: c for c in model_choices()}

    # configs/models/smollm2-135m-instruct.yaml: a GGUF file the empty models folder lacks.
    smollm2 = choices["smollm2-135m-instruct"]
    assert smollm2["available"] is False
    assert smollm2["reason"]
    assert all(c["reason"] for c in choices.values() if not c["available"])


def test_it_tells_a_conversation_its_model_is_gone() -> None:
    models = [
        {"id": "here", "name": "Here", "available": True, "reason": ""},
        {"id": "away", "name": "Away", "available": False, "reason": "not downloaded yet"},
    ]

    def notice(model_id: str) -> str:
        return model_notice(SimpleNamespace(model_id=model_id), models)

    assert notice("here") == ""
    assert notice("away") == (
        "This conversation's model, Away, is unavailable: not downloaded yet. "
        "Pick another model below to go on."
    )
    assert "gone-model, is no longer on this server" in notice("gone-model")
    assert model_notice(None, models) == ""


def test_it_words_the_reason_for_each_kind_of_missing_model(tmp_path: Path) -> None:
    def spec(**values: object) -> ModelSpec:
        return ModelSpec(id="m", name="M", context_length=2048, **values)  # type: ignore[arg-type]

    empty = tmp_path / "half-converted"
    empty.mkdir()

    assert spec(kind="hub", hub_repo="org/model").unavailable_reason() == (
        "not downloaded yet (org/model from the Hugging Face Hub)"
    )
    assert spec(kind="gguf", path=tmp_path / "m.gguf").unavailable_reason() == (
        "its GGUF file is missing from the models folder"
    )
    assert spec(kind="mlx", path=empty).unavailable_reason() == (
        "its folder has no config.json (an incomplete download or conversion)"
    )
    assert spec(kind="mlx", path=tmp_path / "gone").unavailable_reason() == (
        "its folder is missing from the models folder"
    )
