"""The Models page's "In memory" panel: each live worker's loaded models (weights, KV caches,
when they unload) and its memory budget, from the heartbeat rows; and library jobs that hold or
wait for a share of the budget (models_admin.services.memory)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from inference.memory import Reservation, ReservationTable
from inference.models import WorkerHeartbeat

pytestmark = pytest.mark.django_db

URL = reverse("models_admin:index")
GB = 10**9


@pytest.fixture
def table(tmp_path: Path, settings: Any) -> ReservationTable:
    settings.MLXWEB_MEMORY_TABLE = tmp_path / "memory.json"
    return ReservationTable(settings.MLXWEB_MEMORY_TABLE)


def beat(worker_id: str, *, age: float = 0.0, **fields: Any) -> WorkerHeartbeat:
    return WorkerHeartbeat.objects.create(
        worker_id=worker_id, updated_at=timezone.now() - timedelta(seconds=age), **fields
    )


def test_it_shows_what_each_live_worker_holds_and_when_it_unloads(
    admin_client: Client, library: Path, table: ReservationTable
) -> None:
    now = timezone.now()
    beat(
        "gpu-box-1",
        budget_bytes=10 * GB,
        used_bytes=6 * GB,
        streaming=2,
        loaded=[
            {
                "model_id": "llama-3-8b",
                "bytes": 5 * GB,
                "kv_bytes": 512 * 10**6,
                "loaded_at": (now - timedelta(minutes=3)).isoformat(),
                "expires_at": (now + timedelta(minutes=4, seconds=30)).isoformat(),
                "base_model": None,
            },
            {
                "model_id": "<b>sea-lora</b>",
                "bytes": 400 * 10**6,
                "kv_bytes": 0,
                "loaded_at": now.isoformat(),
                "expires_at": None,
                "base_model": "smollm2",
            },
        ],
    )
    beat("gone-worker", age=120, budget_bytes=GB, loaded=[{"model_id": "stale-model"}])

    html = admin_client.get(URL).content.decode()

    panel = html[
        html.index('id="memory-title"') : html.index("</section>", html.index("memory-title"))
    ]
    assert "<strong>5.6\xa0GB</strong> of 9.3\xa0GB used, 3.7\xa0GB free" in panel
    assert '<meter min="0" max="10000000000" value="6000000000"' in panel
    assert "60% of the memory budget used" in panel
    assert "llama-3-8b" in panel and "2 streaming" in panel
    assert "in 4\xa0minutes" in panel
    assert "3\xa0minutes ago" in panel
    assert "stays loaded" in panel
    assert "adapter on smollm2" in panel
    # Autoescaped, and only live workers.
    assert "&lt;b&gt;sea-lora&lt;/b&gt;" in panel and "<b>sea-lora" not in panel
    assert "stale-model" not in panel


def test_it_shows_jobs_holding_or_waiting_for_memory(
    admin_client: Client, library: Path, table: ReservationTable
) -> None:
    table.put(Reservation("j1", os.getpid(), 3 * GB, "Convert tiny to tiny-mlx", "job"))
    table.put(Reservation("j2", os.getpid(), 2 * GB, "Quantize tiny", "job", waiting=True))

    html = admin_client.get(URL).content.decode()

    assert "No inference worker is running" in html
    assert "Convert tiny to tiny-mlx: holds 2.8\xa0GB" in html
    assert "Quantize tiny: waiting for 1.9\xa0GB" in html


def test_strangers_do_not_see_the_panel(client: Client, owner_client: Client) -> None:
    # People who are not staff get the read-only list of models, without the memory panel.
    response = owner_client.get(URL)
    assert response.status_code == 200
    assert "In memory" not in response.content.decode()
    assert client.get(URL).status_code == 302


def write_adapter_folder(folder: Path, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapters.safetensors").write_bytes(b"")


def test_it_lists_the_lora_adapters_with_their_base_or_what_is_wrong(
    admin_client: Client, library: Path, tiny_hf_dir: Path, table: ReservationTable
) -> None:
    write_adapter_folder(library / "tiny-chat-lora", {"base_model": "tiny-hf", "num_layers": 2})
    write_adapter_folder(library / "lost-lora", {"model": "org/<i>gone</i>"})

    html = admin_client.get(URL).content.decode()

    panel = html[html.index('id="adapters-title"') :]
    ready = panel[panel.index("tiny-chat-lora") :]
    assert "tiny-hf" in ready[: ready.index("</tr>")]
    assert "ready: in the chat" in ready[: ready.index("</tr>")]
    lost = panel[panel.index("lost-lora") :]
    assert "is not in the catalogue" in lost[: lost.index("</tr>")]
    assert "&lt;i&gt;gone&lt;/i&gt;" in lost and "<i>gone" not in lost


def test_the_panel_refreshes_itself_for_staff_only(
    admin_client: Client, owner_client: Client, client: Client, table: ReservationTable
) -> None:
    url = reverse("models_admin:memory")
    beat("w1", budget_bytes=4 * GB, used_bytes=GB, loaded=[{"model_id": "tiny", "bytes": GB}])

    response = admin_client.get(url, headers={"HX-Request": "true"})

    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section class="panel memory-panel"')
    assert f'hx-get="{url}"' in html and "tiny" in html and "25%" in html
    assert "<html" not in html
    assert owner_client.get(url).status_code == 403
    assert client.get(url).status_code == 302
    assert admin_client.post(url).status_code == 405
