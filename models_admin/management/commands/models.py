"""`manage.py models`: the model library on the command line.

    manage.py models list [--filter TEXT] [--sort name|size|last-used] [--json]
    manage.py models jobs
    manage.py models pull REPO_ID [--revision REV] [--name NAME]
    manage.py models convert SOURCE [--name NAME] [--dtype T]
                             [-q [--bits B] [--group-size G] [--recipe R]]
    manage.py models quantize SOURCE --bits B [--group-size G] [--recipe R] [--name NAME]
    manage.py models import-gguf PATH [--name NAME] [--bits keep|B] [--group-size G]
    manage.py models validate SOURCE [--tokens N]
    manage.py models export-gguf SOURCE PATH [--type f16|q8_0|q4_0]
    manage.py models delete SOURCE [--yes]

SOURCE is a library model's code, name, chat id, hub repo id or path. Jobs run here, with a
progress bar, and are recorded like the page's; `--background` hands them to the job worker
instead. Inputs are checked by the page's forms: a bad one exits with status 2.

A new job kind adds a subparser in `add_arguments` and a `_handle_<kind>` method.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from argparse import ArgumentParser
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.template.defaultfilters import filesizeformat

from inference.services import CONVERT_DTYPES, GGUF_EXPORT_TYPES, QUANT_RECIPES
from models_admin import services
from models_admin.forms import (
    KEEP_BITS,
    ConvertForm,
    DeleteForm,
    ExportGGUFForm,
    ImportGGUFForm,
    PullForm,
    QuantizeForm,
    ValidateForm,
)
from models_admin.models import LibraryModel, ModelJob

EXIT_USAGE = 2


class Command(BaseCommand):
    help = (
        "List, pull, convert, quantize, import, validate, export and delete models in the "
        "library."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

        listing = sub.add_parser("list", help="the models on this machine")
        listing.add_argument("--filter", default="", help="only names/paths containing this")
        listing.add_argument("--sort", choices=["name", "size", "last-used"], default="name")
        listing.add_argument("--json", action="store_true", help="one JSON object per line")

        sub.add_parser("jobs", help="the most recent jobs")

        pull = sub.add_parser("pull", help="download a repo from the Hugging Face hub")
        pull.add_argument("repo_id")
        pull.add_argument("--revision", default="")
        pull.add_argument("--name", default="", help="its name in the models folder")
        self._add_background(pull)

        convert = sub.add_parser("convert", help="convert a Hugging Face model to MLX")
        convert.add_argument("source")
        convert.add_argument("--name", default="")
        convert.add_argument(
            "--dtype", default="", choices=["", *CONVERT_DTYPES]
        )
        convert.add_argument("-q", "--quantize", action="store_true")
        convert.add_argument("--bits", type=int, default=4)
        convert.add_argument("--group-size", type=int, default=64)
        convert.add_argument(
            "--recipe", default="", choices=["", *QUANT_RECIPES]
        )
        self._add_background(convert)

        quantize = sub.add_parser("quantize", help="quantize an MLX model to fewer bits")
        quantize.add_argument("source")
        quantize.add_argument("--bits", type=int, required=True)
        quantize.add_argument("--group-size", type=int, default=64)
        quantize.add_argument(
            "--recipe", default="", choices=["", *QUANT_RECIPES]
        )
        quantize.add_argument("--name", default="")
        self._add_background(quantize)

        import_gguf = sub.add_parser("import-gguf", help="import a GGUF file as an MLX model")
        import_gguf.add_argument("path", help="a GGUF file inside a folder imports may read")
        import_gguf.add_argument("--name", default="", help="the new model's name")
        import_gguf.add_argument(
            "--bits",
            default=KEEP_BITS,
            help="re-quantize K-quants and other types to this many bits (2, 3, 4, 5, 6, 8), "
            "or keep them as floats (keep, the default); Q4_0/Q4_1/Q8_0 are always kept",
        )
        import_gguf.add_argument("--group-size", type=int, default=64)
        self._add_background(import_gguf)

        validate = sub.add_parser(
            "validate", help="compare a model made here with what it was made from"
        )
        validate.add_argument("source")
        validate.add_argument(
            "--tokens", type=int, default=32, help="greedy tokens compared per prompt"
        )
        self._add_background(validate)

        export = sub.add_parser(
            "export-gguf", help="export a model as a GGUF file (for llama.cpp) in the models folder"
        )
        export.add_argument("source")
        export.add_argument(
            "path", help="the .gguf file's name in the models folder, or a path inside it"
        )
        export.add_argument(
            "--type",
            dest="file_type",
            default="q8_0",
            choices=GGUF_EXPORT_TYPES,
            help="the weights' type (q8_0 by default; q4_0 keeps the embeddings at q8_0)",
        )
        self._add_background(export)

        delete = sub.add_parser("delete", help="delete a model from disk")
        delete.add_argument("source")
        delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        self._add_background(delete)

    @staticmethod
    def _add_background(parser: ArgumentParser) -> None:
        parser.add_argument(
            "--background", action="store_true", help="hand the job to the job worker and exit"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["verbosity"] < 2:
            # The progress bar and the summary say it; the per-step log lines are for -v 2.
            logging.getLogger("models_admin").setLevel(logging.WARNING)
        handler = getattr(self, f"_handle_{options['action'].replace('-', '_')}")
        handler(options)

    # -- reading -------------------------------------------------------------------------------

    def _handle_list(self, options: dict[str, Any]) -> None:
        services.job_reap_dead()
        rows = services.library_scan()
        text = options["filter"].lower()
        if text:
            rows = [r for r in rows if text in r.name.lower() or text in r.path.lower()]
        if options["sort"] == "size":
            rows.sort(key=lambda r: r.size_bytes, reverse=True)
        elif options["sort"] == "last-used":
            rows.sort(
                key=lambda r: r.last_used_at.timestamp() if r.last_used_at else 0, reverse=True
            )
        if options["json"]:
            for row in rows:
                self.stdout.write(json.dumps(_row_json(row)))
            return
        for row in rows:
            flags = ("mlx-loadable" if row.loadable else f"not loadable: {row.load_problem}") + (
                ", chat template" if row.has_chat_template else ""
            )
            self.stdout.write(
                f"{row.name}  [{row.get_source_display()}]  {row.architecture or '?'}  "
                f"{row.quantization or '-'}  {filesizeformat(row.size_bytes)}  "
                f"{row.model_id or '-'}  ({flags})\n    {row.path}"
            )
        total = sum(r.size_bytes for r in rows)
        self.stdout.write(f"{len(rows)} model(s), {filesizeformat(total)}")

    def _handle_jobs(self, options: dict[str, Any]) -> None:
        services.job_reap_dead()
        for job in ModelJob.objects.all()[:20]:
            percent = f"{job.percent:.0f}%" if job.percent is not None else ""
            self.stdout.write(
                f"{job.code}  {job.state:<9} {percent:>4}  {job.title}"
                + (f"  -- {job.error}" if job.error else "")
            )

    # -- jobs ----------------------------------------------------------------------------------

    def _handle_pull(self, options: dict[str, Any]) -> None:
        form = PullForm(
            {
                "repo_id": options["repo_id"],
                "revision": options["revision"],
                "name": options["name"],
            }
        )
        self._run("pull", form, options)

    def _handle_convert(self, options: dict[str, Any]) -> None:
        data = {
            "source": options["source"],
            "name": options["name"],
            "dtype": options["dtype"],
            "bits": options["bits"],
            "group_size": options["group_size"],
            "recipe": options["recipe"],
        }
        if options["quantize"]:
            data["quantize"] = "on"
        self._run("convert", ConvertForm(data), options)

    def _handle_quantize(self, options: dict[str, Any]) -> None:
        data = {
            "source": options["source"],
            "name": options["name"],
            "bits": options["bits"],
            "group_size": options["group_size"],
            "recipe": options["recipe"],
        }
        self._run("quantize", QuantizeForm(data), options)

    def _handle_import_gguf(self, options: dict[str, Any]) -> None:
        data = {
            "path": options["path"],
            "name": options["name"],
            "bits": options["bits"],
            "group_size": options["group_size"],
        }
        self._run("import_gguf", ImportGGUFForm(data), options)

    def _handle_validate(self, options: dict[str, Any]) -> None:
        form = ValidateForm({"source": options["source"], "n_tokens": options["tokens"]})
        self._run("validate", form, options, outcome=_validation_lines)

    def _handle_export_gguf(self, options: dict[str, Any]) -> None:
        data = {key: options[key] for key in ("source", "path", "file_type")}
        form = ExportGGUFForm(data)
        self._run("export_gguf", form, options, outcome=_export_lines)

    def _handle_delete(self, options: dict[str, Any]) -> None:
        form = DeleteForm({"source": options["source"]})
        if not form.is_valid():
            self._invalid(form)
        entry = form.source_model
        preview = services.library_delete_preview(entry=entry)
        self.stdout.write(f"Deleting {entry.name} frees {filesizeformat(preview.freed_bytes)}.")
        if preview.active_replies:
            self.stdout.write(
                f"{preview.active_replies} reply(ies) are streaming from it: it waits for them."
            )
        if not options["yes"]:
            answer = input("Delete it? [y/N] ").strip().lower()
            if answer not in {"y", "yes"}:
                raise CommandError("Not deleted.", returncode=1)
        self._run("delete", form, options)

    def _invalid(self, form: Any) -> None:
        lines: list[str] = []
        for field, errors in form.errors.items():
            label = "" if field == "__all__" else f"{field.replace('_', '-')}: "
            lines.extend(f"{label}{error}" for error in errors)
        raise CommandError("\n".join(lines), returncode=EXIT_USAGE)

    def progress_bar(self, *, disable: bool) -> Any:
        """What a job run here reports its progress to (the `mlxweb` command shows its own)."""
        return _ProgressBar(disable=disable)

    def _run(
        self,
        kind: str,
        form: Any,
        options: dict[str, Any],
        outcome: Callable[[dict[str, Any]], list[str]] | None = None,
    ) -> None:
        """Run a job here with a progress bar (or queue it); `outcome` turns its result into
        the lines printed at the end (the result as JSON by default)."""
        if not form.is_valid():
            self._invalid(form)
        params = form.job_params()
        if options["background"]:
            job = services.job_create(kind=kind, params=params)
            self.stdout.write(f"Queued {job.title}: job {job.code}")
            return
        job = services.job_create(kind=kind, params=params, enqueue=False)
        self.stdout.write(f"{job.title} (job {job.code})")
        bar = self.progress_bar(disable=options.get("verbosity", 1) == 0)
        try:
            job = services.job_run(
                job=job,
                worker=f"cli@{socket.gethostname()}:{os.getpid()}",
                mirror=bar,
            )
        except KeyboardInterrupt:
            bar.close()
            raise CommandError("Interrupted: the job was cancelled.", returncode=130) from None
        bar.finish(job)
        for line in job.log_lines[-5:]:
            self.stdout.write(f"  {line}")
        if job.state == ModelJob.State.SUCCEEDED:
            if outcome is None:
                self.stdout.write(self.style.SUCCESS(f"Done: {json.dumps(job.result)}"))
            else:
                for line in outcome(job.result):
                    self.stdout.write(self.style.SUCCESS(line))
            return
        if job.state == ModelJob.State.CANCELLED:
            raise CommandError("Cancelled.", returncode=1)
        raise CommandError(job.error or "The job failed.", returncode=1)


def _validation_lines(result: dict[str, Any]) -> list[str]:
    """A validation's summary, then each prompt's two answers."""
    lines = [f"Done: {result['summary']}"]
    for prompt in result["prompts"]:
        lines.append(
            f"  {prompt['prompt']} [{prompt['matching_tokens']}/{result['n_tokens']} same]\n"
            f"    {result['candidate']}: {prompt['candidate_text'].strip()[:200]!r}\n"
            f"    {result['reference']}: {prompt['reference_text'].strip()[:200]!r}"
        )
    return lines


def _export_lines(result: dict[str, Any]) -> list[str]:
    types = ", ".join(f"{n} {t}" for t, n in result["tensor_types"].items())
    size = filesizeformat(result["size_bytes"])
    return [
        f"Done: {result['path']} ({size}, {result['architecture']}, {types}) "
        f"in {result['seconds']:.1f}s"
    ]


def _row_json(row: LibraryModel) -> dict[str, Any]:
    return {
        "code": str(row.code),
        "name": row.name,
        "source": row.source,
        "path": row.path,
        "model_id": row.model_id,
        "architecture": row.architecture,
        "parameters": row.parameter_count,
        "bits": row.quant_bits,
        "group_size": row.quant_group_size,
        "size_bytes": row.size_bytes,
        "loadable": row.loadable,
        "load_problem": row.load_problem,
        "chat_template": row.has_chat_template,
        "last_used": row.last_used_at.isoformat() if row.last_used_at else None,
    }


class _ProgressBar:
    """A tqdm bar on stderr for each step of a job run here: the job's progress passes each
    step, advance and description change on to it as it happens (`ProgressMirror`)."""

    cancelled = False  # Ctrl-C cancels the job; the bar never asks for it

    def __init__(self, *, disable: bool) -> None:
        self.disable = disable
        self.bar: Any = None

    def step(
        self, text: str, *, total: int | None = None, done: int = 0, unit: str = "steps"
    ) -> None:
        if self.disable:
            return
        from tqdm import tqdm

        self.close()
        unit_bytes = unit == ModelJob.Unit.BYTES
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="B" if unit_bytes else "step",
            unit_scale=unit_bytes,
            unit_divisor=1024 if unit_bytes else 1000,
            desc=text[:40],
            leave=True,
            # The download's own (silent) tqdm bars would otherwise push this one down.
            position=0,
        )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def rename(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text[:40])

    def log(self, line: str) -> None:
        pass  # the job's log is printed at the end

    def finish(self, job: ModelJob) -> None:
        """Show where the job ended."""
        if self.bar is not None and job.total:
            self.bar.n = job.done
            self.bar.refresh()
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
