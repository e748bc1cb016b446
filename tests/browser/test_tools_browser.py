"""What a person sees of a tool call in chromium (issue 11): the python step waits, Approve runs
it in the sandbox, its output shows in the reply, and the reply goes on."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import signed_up_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


# The tiny test model writes noise, so the reply that calls python is recorded here (as the
# command-line chat records its replies); the model's side of the loop, forced and constrained,
# is tests/tools/test_loop.py. What follows the call is the live site's own work: the step, the
# approval, the sandboxed run and the continued reply.
RECORD_A_PYTHON_CALL = """
import json
from django.contrib.auth.models import User
from chat.models import Conversation, Message
from inference import services
from inference.models import Generation
from inference.schemas import ChatMessage
user = User.objects.get(username="ada")
conversation = Conversation.objects.create(user=user, model_id="tiny", tools_enabled=True)
question = "Print six times seven."
asked = Message.objects.create(conversation=conversation, role="user", content=question)
generation = services.generation_record(
    model_id="tiny",
    messages=[ChatMessage(role="user", content=question)],
    text="",
    params=services.generation_params(model_id="tiny", overrides={"max_tokens": 8}),
    user=user,
    finish_reason=Generation.FinishReason.TOOL_CALLS,
)
call = {"id": "call_1", "name": "python", "arguments": json.dumps({"code": "print(6 * 7)"})}
Generation.objects.filter(pk=generation.pk).update(tool_calls=[call])
reply = Message.objects.create(
    conversation=conversation, role="assistant", generation=generation, parent=asked
)
Conversation.objects.filter(pk=conversation.pk).update(leaf=reply)
print(conversation.code)
"""


@pytest.fixture(scope="module")
def page(browser, live_site):  # type: ignore[no-untyped-def]
    with signed_up_page(browser, live_site.url, "ada") as page:
        yield page


def test_it_approves_a_python_call_and_shows_its_output(page: Page, live_site) -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("the python tool needs bubblewrap (scripts/test installs it)")
    # The sandbox runs as nobody when the tests run as root, and pytest keeps its temporary
    # folders (the site's var/, where workspaces live) closed to others: let it pass through.
    var = Path(live_site.env["MLXWEB_VAR_DIR"])
    for folder in [var, *var.parents]:
        if folder == Path(folder.anchor) or not folder.exists():
            continue
        folder.chmod(folder.stat().st_mode | stat.S_IXOTH)
    code = live_site.manage("shell", "-c", RECORD_A_PYTHON_CALL).strip().splitlines()[-1]
    page.goto(f"{live_site.url}/c/{code}/")
    step = page.locator(".tool-step").first
    # The step is made when the page's socket connects (no tab was open when the reply ended):
    # on a loaded CI machine that took more than the default 5 s once.
    expect(step).to_contain_text("python", timeout=30_000)
    expect(step).to_contain_text("waiting for approval")
    expect(step.locator(".tool-arguments")).to_contain_text("print(6 * 7)")
    step.get_by_role("button", name="Approve").click()
    done = page.locator(".tool-step.done")
    expect(done).to_be_visible(timeout=60_000)
    done.locator("summary").click()  # a finished step is folded; a person opens it
    expect(done.locator(".tool-result")).to_contain_text("42")
    # The sandbox's start ran no fork handlers (gRPC's log a line when they do). In CI this step
    # once never ended, and once the reply after it never began: a fork() ran OpenBLAS's
    # handler while the engine thread multiplied (inference/tools/python.py, _as_nobody).
    assert "fork_posix" not in live_site.log("web")
    # the result went back to the model: a second reply follows and finishes.
    expect(page.locator(".message.assistant")).to_have_count(2, timeout=60_000)
    expect(page.locator(".message.assistant").last.locator(".meta")).to_be_visible(timeout=150_000)
    # and it all survives a reload
    page.reload()
    expect(page.locator(".tool-step.done .tool-result")).to_contain_text("42")
