"""The `pull` job kind: a hub repo into the Hugging Face cache, linked into the models folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.template.defaultfilters import filesizeformat

from inference import services as inference_services
from models_admin import hub
from models_admin.models import ModelJob
from models_admin.progress import JobCancelled, JobError, JobProgress
from models_admin.services.jobs import job_kind
from models_admin.services.paths import NAME_RE, default_model_name


def _link_pulled(snapshot: Path, name: str, repo_id: str, progress: JobProgress) -> str | None:
    """Link a pulled model into the models folder, where the chat's catalogue finds it."""
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    models_dir.mkdir(parents=True, exist_ok=True)
    storage = hub.storage_folder(Path(settings.MLXWEB_HF_CACHE), repo_id)
    for candidate in [name] + [f"{name}-{i}" for i in range(2, 10)]:
        link = models_dir / candidate
        if link.is_symlink() and storage in Path(os.path.realpath(link)).parents:
            link.unlink()  # an older revision of the same repo: point it at this one
        if link.exists() or link.is_symlink():
            continue
        tmp = models_dir / f".staging-link-{uuid.uuid4().hex}"
        tmp.symlink_to(snapshot, target_is_directory=True)
        os.replace(tmp, link)
        progress.log(f"linked into the models folder as {candidate}")
        return candidate
    progress.log(f"not linked: the models folder already has models named {name}")
    return None


def _describe_pull(params: dict[str, Any]) -> str:
    revision = params.get("revision")
    return f"Pull {params['repo_id']}" + (f"@{revision}" if revision else "")


@job_kind("pull", heavy=False, describe=_describe_pull)
def model_pull(
    *,
    repo_id: str,
    progress: JobProgress,
    revision: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Download a repo's weights, configs and tokenizer into the Hugging Face cache.

    Links it into the models folder (so the chat can use it) when mlx-lm can load it.
    """
    if name is not None and not NAME_RE.match(name):
        raise JobError(f"{name!r} is not a usable folder name.")
    cache_dir = Path(settings.MLXWEB_HF_CACHE)
    endpoint = settings.MLXWEB_HF_ENDPOINT
    token = os.environ.get("HF_TOKEN") or None
    storage = hub.storage_folder(cache_dir, repo_id)
    watched = [storage, cache_dir / ".locks" / storage.name]
    before = hub.files_under(watched)

    progress.step(f"looking up {repo_id}@{revision or 'main'}")
    with hub.hub_errors(repo_id=repo_id, revision=revision, endpoint=endpoint):
        plan = hub.plan(repo_id=repo_id, revision=revision, endpoint=endpoint, token=token)
        if not any(name.endswith(".safetensors") for name in plan.files):
            raise JobError(
                f"{repo_id} has no safetensors weights; only safetensors are pulled "
                "(pickled .bin/.pt weights never are)."
            )
        present = hub.present_bytes(cache_dir, plan)
        size = filesizeformat(plan.total_bytes)
        progress.log(
            f"commit {plan.commit[:12]}: {len(plan.files)} files, {size}"
            + (f", {filesizeformat(present)} already here" if present else "")
        )
        hub.check_free_space(cache_dir, plan.total_bytes - present)
        progress.check_cancelled()
        progress.step(
            f"downloading {len(plan.files)} files",
            total=plan.total_bytes,
            unit=ModelJob.Unit.BYTES,
            done=present,
        )
        try:
            snapshot = hub.download(
                plan=plan, cache_dir=cache_dir, endpoint=endpoint, progress=progress, token=token
            )
        except (JobCancelled, KeyboardInterrupt):
            removed = hub.remove_added(before, watched)
            progress.log(f"removed {removed} partly downloaded files and folders")
            raise
    progress.set_done(plan.total_bytes)
    progress.check_cancelled()

    progress.set_step_text("checking the model")
    details = inference_services.model_dir_inspect(path=snapshot)
    linked = None
    if details["loadable"]:
        linked = _link_pulled(snapshot, name or default_model_name(repo_id, ""), repo_id, progress)
    else:
        progress.log(f"not linked into the chat: {details['load_problem']}")
    return {
        "path": str(snapshot),
        "repo_id": repo_id,
        "revision": plan.commit,
        "files": len(plan.files),
        "bytes": plan.total_bytes,
        "linked_as": linked,
        "model_id": inference_services.model_id_for_folder(name=linked) if linked else None,
        "loadable": details["loadable"],
    }
