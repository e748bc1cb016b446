"""The files of tool steps (screenshots, plots): shown to the conversation's owner only, from its
workspace only, addressed by step and index."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from chat import services
from chat.models import Conversation, Message, ToolStep
from inference.models import Generation

MODEL = "smollm2-135m-instruct"
# The smallest valid PNG: one transparent pixel.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@pytest.fixture
def conversation(owner, models_root, settings, tmp_path: Path) -> Conversation:  # type: ignore[no-untyped-def]
    settings.VAR_DIR = tmp_path / "var"
    return Conversation.objects.create(user=owner, model_id=MODEL, title="Plots")


def _step(conversation: Conversation, files: list[dict[str, str]]) -> ToolStep:
    generation = Generation.objects.create(
        model_id=MODEL,
        state=Generation.State.COMPLETE,
        finish_reason=Generation.FinishReason.TOOL_CALLS,
    )
    reply = Message.objects.create(
        conversation=conversation, role="assistant", generation=generation
    )
    return ToolStep.objects.create(
        message=reply,
        call_id="call_1",
        name="browser_screenshot",
        arguments={"url": "https://example.org/"},
        state=ToolStep.State.DONE,
        ok=True,
        result="Screenshot saved.",
        files=files,
    )


@pytest.fixture
def step(conversation: Conversation) -> ToolStep:
    workspace = services.workspace_for(conversation)
    (workspace / "screenshots").mkdir()
    image = workspace / "screenshots" / "shot.png"
    image.write_bytes(PNG)
    (workspace / "notes.html").write_text("<script>alert(1)</script>")
    return _step(
        conversation,
        [
            {"name": "shot.png", "mime": "image/png", "path": str(image)},
            {"name": "notes.html", "mime": "text/html", "path": str(workspace / "notes.html")},
        ],
    )


def _url(conversation: Conversation, step: ToolStep, index: int) -> str:
    return reverse("chat:tool_file", args=[conversation.code, step.code, index])


def test_it_shows_the_owner_the_image(owner_client: Client, conversation, step) -> None:
    response = owner_client.get(_url(conversation, step, 0))
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "attachment" not in response.get("Content-Disposition", "")
    assert b"".join(response.streaming_content) == PNG  # type: ignore[attr-defined]


def test_it_downloads_other_files_instead_of_showing_them(
    owner_client: Client, conversation, step
) -> None:
    response = owner_client.get(_url(conversation, step, 1))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"].startswith("attachment")
    assert response["X-Content-Type-Options"] == "nosniff"


def test_it_shows_the_image_in_the_step(owner_client: Client, conversation, step) -> None:
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert f'<img class="tool-image" src="{_url(conversation, step, 0)}" alt="shot.png"' in body
    assert f'href="{_url(conversation, step, 1)}" download>notes.html</a>' in body
    assert f'src="{_url(conversation, step, 1)}"' not in body


def test_it_hides_files_from_strangers_and_anonymous_users(
    client: Client, stranger_client: Client, conversation, step
) -> None:
    assert stranger_client.get(_url(conversation, step, 0)).status_code == 404
    response = client.get(_url(conversation, step, 0))
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_it_serves_no_file_outside_the_conversations_workspace(
    owner_client: Client, conversation, step, stranger, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    workspace = services.workspace_for(conversation)
    (workspace / "link.png").symlink_to(secret)
    # Another conversation's step cannot be reached through this conversation's URL either.
    other = Conversation.objects.create(user=stranger, model_id=MODEL, title="Other")
    other_step = _step(other, [{"name": "s.png", "mime": "image/png", "path": str(secret)}])
    bad = _step(
        conversation,
        [
            {"name": "secret.png", "mime": "image/png", "path": str(secret)},
            {"name": "up.png", "mime": "image/png", "path": str(workspace / ".." / "x.png")},
            {"name": "link.png", "mime": "image/png", "path": str(workspace / "link.png")},
            {"name": "dir", "mime": "image/png", "path": str(workspace)},
        ],
    )
    for index in range(4):
        assert owner_client.get(_url(conversation, bad, index)).status_code == 404
    assert owner_client.get(_url(conversation, step, 2)).status_code == 404
    assert owner_client.get(_url(conversation, other_step, 0)).status_code == 404
    # The URL takes only an index: a path in its place matches no route.
    url = _url(conversation, step, 0).replace("/0/", "/..%2F..%2Fsecret.png/")
    assert owner_client.get(url).status_code == 404


def test_it_refuses_the_wrong_method(owner_client: Client, conversation, step) -> None:
    assert owner_client.post(_url(conversation, step, 0)).status_code == 405
