"""Presets (issue 9): built-in files, inheritance chains and cycles, placeholders, ${ENV} in
config files only, bounds errors next to the field, and each user's own presets."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from chat import presets as chat_presets
from chat.models import Conversation
from chat.models import Preset as PresetRow
from inference.presets import (
    PresetError,
    PresetSpec,
    load_presets,
    placeholder_problems,
    render_system_prompt,
    resolve,
    system_prompt_pattern,
)

MODEL = "smollm2-135m-instruct"
CONFIG_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "presets"


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def fresh_builtins():  # type: ignore[no-untyped-def]
    chat_presets._builtins.cache_clear()
    yield
    chat_presets._builtins.cache_clear()


# --- files ------------------------------------------------------------------------------------


def test_it_loads_the_builtins_with_their_chains() -> None:
    presets = load_presets(CONFIG_PRESETS)
    assert {"creative", "balanced", "deterministic"} <= set(presets)
    assert presets["balanced"].sampling == {"temperature": 0.2, "top_p": 0.9}
    deterministic = presets["deterministic"]
    assert deterministic.chain == ("deterministic", "balanced")
    assert deterministic.sampling == {"temperature": 0.0, "top_p": 1.0}
    assert presets["creative"].sampling["min_p"] == 0.05


def test_it_resolves_chains_of_any_depth(tmp_path: Path) -> None:
    _write(tmp_path, "base", "system: You are terse.\nsampling:\n  temperature: 0.3\n  top_k: 40\n")
    _write(tmp_path, "middle", "extends: base\nsampling:\n  temperature: 0.5\n")
    _write(tmp_path, "top", "extends: middle\nsampling:\n  max_tokens: 64\ntools: true\n")
    top = load_presets(tmp_path, environ={})["top"]
    assert top.chain == ("top", "middle", "base")
    assert top.sampling == {"temperature": 0.5, "top_k": 40, "max_tokens": 64}
    assert top.system == "You are terse."
    assert top.tools is True


def test_it_rejects_a_cycle_naming_the_file_and_the_chain(tmp_path: Path) -> None:
    _write(tmp_path, "a", "extends: b\n")
    _write(tmp_path, "b", "extends: c\n")
    _write(tmp_path, "c", "extends: a\n")
    with pytest.raises(PresetError) as caught:
        load_presets(tmp_path, environ={})
    message = str(caught.value)
    assert str(tmp_path / "a.yaml") in message
    assert "a -> b -> c -> a" in message


def test_it_rejects_an_unknown_parent(tmp_path: Path) -> None:
    _write(tmp_path, "child", "extends: nowhere\n")
    with pytest.raises(PresetError, match=r"extends 'nowhere', which does not exist"):
        load_presets(tmp_path, environ={})


def test_it_names_the_file_and_the_field_of_an_out_of_bounds_value(tmp_path: Path) -> None:
    _write(tmp_path, "hot", "sampling:\n  temperature: 5\n")
    with pytest.raises(PresetError) as caught:
        load_presets(tmp_path, environ={})
    assert str(tmp_path / "hot.yaml") in str(caught.value)
    assert "temperature" in str(caught.value)


def test_it_refuses_settings_that_are_not_sampling(tmp_path: Path) -> None:
    _write(tmp_path, "odd", "sampling:\n  logprobs: true\n")
    with pytest.raises(PresetError, match="logprobs: not a sampling setting"):
        load_presets(tmp_path, environ={})


def test_it_resolves_env_variables_in_config_files_at_load(tmp_path: Path) -> None:
    _write(tmp_path, "team", "system: You work for ${TEAM_NAME} on {date}.\n")
    preset = load_presets(tmp_path, environ={"TEAM_NAME": "Acme"})["team"]
    assert preset.system == "You work for Acme on {date}."


def test_it_names_an_unset_env_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "team", "system: You work for ${TEAM_NAME}.\n")
    with pytest.raises(PresetError) as caught:
        load_presets(tmp_path, environ={})
    assert str(path) in str(caught.value)
    assert "TEAM_NAME is not set" in str(caught.value)


def test_an_unknown_placeholder_in_a_file_is_an_error_at_load(tmp_path: Path) -> None:
    _write(tmp_path, "bad", "system: Today is {weekday}.\n")
    with pytest.raises(PresetError, match=r"unknown placeholder \{weekday\}"):
        load_presets(tmp_path, environ={})


# --- placeholders -----------------------------------------------------------------------------


def test_it_fills_known_placeholders_and_leaves_other_braces() -> None:
    text = 'Hi {user}, I am {model}; today {date} at {time}. {{date}} stays. JSON: {"a": 1}'
    assert placeholder_problems(text) == []
    rendered = render_system_prompt(
        text, now=datetime(2026, 3, 4, 9, 30), user="alice", model="SmolLM2"
    )
    assert rendered == (
        "Hi alice, I am SmolLM2; today 2026-03-04 (Wednesday) at 09:30. {date} stays. "
        'JSON: {"a": 1}'
    )


def test_it_lists_unknown_placeholders() -> None:
    problems = placeholder_problems("{date} {weekday} {city}")
    assert len(problems) == 2
    assert "{weekday}" in problems[0] and "{city}" in problems[1]


def test_a_rendered_prompt_matches_its_template_at_any_time_but_not_another_user() -> None:
    template = "Today is {date}, {time}. You talk to {user}."
    earlier = render_system_prompt(
        template, now=datetime(2026, 1, 1, 8, 0), user="alice", model="m"
    )
    assert system_prompt_pattern(template, user="alice", model="m").fullmatch(earlier)
    assert not system_prompt_pattern(template, user="bob", model="m").fullmatch(earlier)
    assert not system_prompt_pattern("Other. {date}", user="alice", model="m").fullmatch(earlier)


def test_resolve_reports_the_chain_of_a_cycle_in_user_presets() -> None:
    specs = {
        "mine": PresetSpec(name="mine", extends="balanced"),
        "balanced": PresetSpec(name="balanced", extends="mine"),
    }
    with pytest.raises(PresetError, match="mine -> balanced -> mine"):
        resolve("mine", specs.get)


# --- the presets pages ------------------------------------------------------------------------


def _preset_post(**values: str) -> dict[str, str]:
    return {
        "name": "Coder",
        "description": "",
        "extends": "",
        "system_prompt": "",
        "model_id": "",
        "tools": "",
        **values,
    }


def test_it_shows_the_presets_page_with_builtins(owner_client: Client) -> None:
    response = owner_client.get(reverse("chat:presets"))
    body = response.content.decode()
    assert response.status_code == 200
    for name in ("balanced", "creative", "deterministic"):
        assert name in body
    assert "extends balanced" in body


def test_anonymous_users_sign_in_first(client: Client, db) -> None:  # type: ignore[no-untyped-def]
    for url in (reverse("chat:presets"), reverse("chat:preset_create")):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_list_refuses_post(owner_client: Client) -> None:
    assert owner_client.post(reverse("chat:presets")).status_code == 405


def test_it_creates_a_preset_that_extends_a_builtin(owner_client: Client, owner: User) -> None:
    response = owner_client.post(
        reverse("chat:preset_create"),
        _preset_post(
            extends="deterministic",
            system_prompt="You are {model}, helping {user}.",
            max_tokens="200",
            stop="END\n\nSTOP",
            tools="on",
        ),
    )
    assert response.status_code == 302
    row = PresetRow.objects.get(user=owner, name="Coder")
    assert row.params == {"max_tokens": 200, "stop": ["END", "STOP"]}
    assert row.tools is True
    preset = chat_presets.Presets(owner).get("Coder")
    assert preset.chain == ("Coder", "deterministic", "balanced")
    assert preset.sampling == {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 200,
        "stop": ["END", "STOP"],
    }


def test_an_out_of_bounds_value_comes_back_next_to_its_field(owner_client: Client) -> None:
    response = owner_client.post(
        reverse("chat:preset_create"), _preset_post(temperature="5", top_p="0")
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert 'id="id_temperature-error"' in body
    assert "Temperature goes from 0 to 2; 5 is out of range." in body
    assert "Top p goes more than 0, at most 1; 0 is out of range." in body
    assert not PresetRow.objects.exists()


def test_an_unknown_placeholder_is_an_error_when_saving(owner_client: Client) -> None:
    response = owner_client.post(
        reverse("chat:preset_create"), _preset_post(system_prompt="It is {weekday}.")
    )
    assert response.status_code == 400
    assert "unknown placeholder {weekday}" in response.content.decode()
    assert not PresetRow.objects.exists()


def test_env_variables_are_refused_in_the_browser(owner_client: Client) -> None:
    response = owner_client.post(
        reverse("chat:preset_create"), _preset_post(system_prompt="Key: ${MLXWEB_SECRET_KEY}")
    )
    assert response.status_code == 400
    assert "only allowed in configs/presets/ files" in response.content.decode()
    assert not PresetRow.objects.exists()


def test_a_builtin_name_is_refused(owner_client: Client) -> None:
    response = owner_client.post(reverse("chat:preset_create"), _preset_post(name="balanced"))
    assert response.status_code == 400
    assert "is a built-in preset" in response.content.decode()


def test_an_edit_that_makes_a_cycle_is_refused_with_the_chain(
    owner_client: Client, owner: User
) -> None:
    PresetRow.objects.create(user=owner, name="first", extends="balanced")
    PresetRow.objects.create(user=owner, name="second", extends="first")
    response = owner_client.post(
        reverse("chat:preset_edit", args=["first"]),
        _preset_post(name="first", extends="second"),
    )
    assert response.status_code == 400
    body = response.content.decode()
    assert 'id="id_extends-error"' in body
    assert "first -&gt; second -&gt; first" in body
    assert PresetRow.objects.get(name="first").extends == "balanced"


def test_a_preset_that_others_extend_is_not_deleted(owner_client: Client, owner: User) -> None:
    PresetRow.objects.create(user=owner, name="base")
    PresetRow.objects.create(user=owner, name="child", extends="base")
    confirm = owner_client.get(reverse("chat:preset_delete", args=["base"]))
    assert confirm.status_code == 200 and "Delete the preset" in confirm.content.decode()
    response = owner_client.post(reverse("chat:preset_delete", args=["base"]), follow=True)
    assert "child extends this preset" in response.content.decode()
    assert PresetRow.objects.filter(name="base").exists()
    owner_client.post(reverse("chat:preset_delete", args=["child"]))
    owner_client.post(reverse("chat:preset_delete", args=["base"]))
    assert not PresetRow.objects.exists()


def test_only_the_owner_sees_and_changes_a_preset(owner: User, stranger_client: Client) -> None:
    PresetRow.objects.create(user=owner, name="private", system_prompt="secret plan")
    assert "private" not in stranger_client.get(reverse("chat:presets")).content.decode()
    for name in ("chat:preset_edit", "chat:preset_delete"):
        assert stranger_client.get(reverse(name, args=["private"])).status_code == 404
        assert stranger_client.post(reverse(name, args=["private"])).status_code == 404
    # Nor can they extend it: to them it does not exist.
    response = stranger_client.post(
        reverse("chat:preset_create"), _preset_post(name="mine", extends="private")
    )
    assert response.status_code == 400
    assert PresetRow.objects.filter(name="private", system_prompt="secret plan").exists()


def test_it_edits_a_preset(owner_client: Client, owner: User) -> None:
    PresetRow.objects.create(user=owner, name="terse", params={"temperature": 0.5})
    page = owner_client.get(reverse("chat:preset_edit", args=["terse"]))
    assert 'value="0.5"' in page.content.decode()
    owner_client.post(
        reverse("chat:preset_edit", args=["terse"]),
        _preset_post(name="terse", temperature="0.1", description="short answers"),
    )
    row = PresetRow.objects.get(user=owner, name="terse")
    assert row.params == {"temperature": 0.1} and row.description == "short answers"


def test_a_conversation_with_a_tools_preset_gets_tools(owner: User, models_root: Path) -> None:
    PresetRow.objects.create(user=owner, name="agent", tools=True)
    conversation = Conversation.objects.create(user=owner, model_id=MODEL)
    chat_presets.conversation_settings_save(
        conversation=conversation, preset="agent", system_prompt="", params={}, tools=None
    )
    conversation.refresh_from_db()
    assert conversation.preset == "agent" and conversation.tools_enabled is True


def test_a_broken_builtin_file_is_reported_on_the_page(
    owner_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "presets").mkdir()
    _write(tmp_path / "presets", "loop", "extends: loop\n")
    monkeypatch.setenv("MLXWEB_CONFIG_DIR", str(tmp_path))
    body = owner_client.get(reverse("chat:presets")).content.decode()
    assert "The built-in presets could not be read" in body
    assert str(tmp_path / "presets" / "loop.yaml") in body and "loop -&gt; loop" in body
