"""The library verbs: `mlxweb list`, `jobs`, `pull`, `convert`, `quantize`, `import-gguf`,
`validate`, `delete`, `export-gguf`.

They are `manage.py models` (models_admin/management/commands/models.py): each verb's arguments
are copied from that command's own subparser, and the verb runs that command's handler through
`call_command`, so the forms, the job rows and the messages are the same. Only the presentation
differs: a rich progress bar, and a table (or one JSON document with `--json`) for listings.
"""

from __future__ import annotations

import argparse
import json
import sys
from io import StringIO
from typing import Any

from mlxweb.cli import EXIT_OK, CLIError, verb_parser

# The job verbs of `manage.py models`, in the order `mlxweb --help` lists them.
JOB_VERBS = ("pull", "import-gguf", "convert", "quantize", "validate", "delete", "export-gguf")


def _models_parsers() -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    """`manage.py models`' subparsers by verb, and each verb's help."""
    from models_admin.management.commands.models import Command

    scratch = argparse.ArgumentParser(add_help=False)
    Command().add_arguments(scratch)
    (action,) = (a for a in scratch._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return dict(action.choices), helps


def add_verbs(verbs: Any) -> None:
    parsers, helps = _models_parsers()

    # The same options as `manage.py models list` (--filter, --sort, --json).
    verb_parser(
        verbs, "list", _list, help=helps["list"], parents=[parsers["list"]], add_help=False
    )

    jobs = verb_parser(verbs, "jobs", _jobs, help="the most recent library jobs")
    jobs.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    for verb in JOB_VERBS:
        verb_parser(
            verbs, verb, _job, help=helps.get(verb, ""), parents=[parsers[verb]], add_help=False
        )


class _LibraryCommand:
    """`manage.py models` with the terminal's rich progress bar (built lazily: the command's
    module needs Django)."""

    @staticmethod
    def create() -> Any:
        from models_admin.management.commands.models import Command

        class LibraryCommand(Command):
            def progress_bar(self, *, disable: bool) -> Any:
                from mlxweb.cli.progress import JobProgressBar

                return JobProgressBar(disable=disable)

        return LibraryCommand()


def call_models(*tokens: str, stdout: Any = None) -> None:
    """Run `manage.py models TOKENS` here; its CommandError becomes a CLIError with the same
    exit status (2 for input the forms refused, 1 for a failed job, 130 for Ctrl-C)."""
    from django.core.management import CommandError, call_command

    try:
        call_command(
            _LibraryCommand.create(),
            *tokens,
            stdout=stdout if stdout is not None else sys.stdout,
            stderr=sys.stderr,
        )
    except CommandError as e:
        raise CLIError(str(e), code=e.returncode) from None


def _job(args: argparse.Namespace, tokens: list[str]) -> int:
    call_models(args.verb, *tokens)
    return EXIT_OK


def library_rows(tokens: list[str]) -> list[dict[str, Any]]:
    """The rows `manage.py models list --json` prints, for these list options."""
    out = StringIO()
    options = [t for t in tokens if t != "--json"]
    call_models("list", *options, "--json", stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _list(args: argparse.Namespace, tokens: list[str]) -> int:
    from rich.markup import escape
    from rich.table import Table

    from mlxweb.cli.output import console, size

    rows = library_rows(tokens)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("source")
    table.add_column("architecture")
    table.add_column("quant")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("chat id", no_wrap=True)
    table.add_column("loadable")
    problems: list[str] = []
    for row in rows:
        if not row["loadable"]:
            problems.append(f"{escape(row['name'])}: [red]{escape(row['load_problem'])}[/]")
        table.add_row(
            escape(row["name"]),
            row["source"],
            escape(row["architecture"] or "?"),
            f"{row['bits']}-bit" if row["bits"] else "-",
            size(row["size_bytes"]),
            escape(row["model_id"] or "-"),
            "yes" if row["loadable"] else "[red]no[/]",
        )
    out = console()
    out.print(table)
    for line in problems:
        out.print(line)
    total = sum(row["size_bytes"] for row in rows)
    out.print(f"{len(rows)} model(s), {size(total)}", style="dim")
    return EXIT_OK


def job_json(job: Any) -> dict[str, Any]:
    return {
        "code": str(job.code),
        "kind": job.kind,
        "title": job.title,
        "state": job.state,
        "step": job.step,
        "percent": job.percent,
        "error": job.error,
        "created_at": job.created_at.isoformat() if job.created_at else None,
    }


def _jobs(args: argparse.Namespace, tokens: list[str]) -> int:
    from rich.markup import escape
    from rich.table import Table

    from mlxweb.cli.output import console
    from models_admin import services
    from models_admin.models import ModelJob

    services.job_reap_dead()
    jobs = [job_json(job) for job in ModelJob.objects.all()[:20]]
    if args.json:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("job", "state", "done", "title"):
        table.add_column(column, justify="right" if column == "done" else "left")
    for job in jobs:
        done = f"{job['percent']:.0f}%" if job["percent"] is not None else ""
        error = f" [red]-- {escape(job['error'])}[/]" if job["error"] else ""
        title = escape(job["title"]) + error
        table.add_row(job["code"], job["state"], done, title)
    console().print(table)
    return EXIT_OK
