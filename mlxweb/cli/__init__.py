"""The `mlxweb` command: serve, status, the model library, chat in the terminal, completions.

    mlxweb serve [--host H] [--port P] ...   migrate, fetch the default model, serve
    mlxweb status [--json]                   is a server running; its worker, models, streams, jobs
    mlxweb list | jobs [--json]              the model library (the same code as manage.py models)
    mlxweb pull | convert | quantize | import-gguf | validate | delete | export-gguf ...
    mlxweb run MODEL [PROMPT]                one answer, or a chat when no prompt is given
    mlxweb completion bash|zsh|fish          a completion script for the shell

Exit codes: 0 done, 1 failed (a job failed, no server answers `status`, a reply ended in an
error), 2 bad usage or input (argparse, the library's forms, an unknown model), 130 interrupted.

Every verb but `completion` sets Django up the way `manage.py` does (configuration checked, data
folder and secret key made, OpenBLAS preloaded), since the library verbs' arguments come from
`manage.py models`' own parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A failure to report in one line on stderr, with the exit status it means."""

    def __init__(self, message: str, *, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[argparse.Namespace, list[str]], int]


def bootstrap(argv: Sequence[str] | None = None) -> None:
    """Set Django up as `manage.py` does, once; `argv` (the command line to re-run with
    OpenBLAS preloaded) is None where no re-exec may happen (completions, tests)."""
    import django
    from django.apps import apps

    if apps.ready:
        return
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    from mlxweb.config import ConfigError, load_config
    from mlxweb.launcher import ensure_fast_blas
    from mlxweb.paths import prepare_data_folder

    try:
        config = load_config()
    except ConfigError as e:
        raise CLIError(f"the configuration is invalid:\n{e}", code=EXIT_USAGE) from None
    prepare_data_folder(config.server)
    if argv is not None:
        ensure_fast_blas(list(argv))
    django.setup()


def _reexec_argv() -> list[str]:
    """This command line as `python ARGV` re-runs it. `python -m mlxweb` must stay a module
    run: run as a script, mlxweb/ would be on sys.path and its celery.py would shadow Celery."""
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return ["-m", "mlxweb", *sys.argv[1:]]
    return list(sys.argv)


def build_parser(prog: str = "mlxweb") -> argparse.ArgumentParser:
    from mlxweb.cli import chat, completion, library, server

    parser = argparse.ArgumentParser(
        prog=prog,
        description="mlxweb: serve the chat app, manage the model library, chat in the terminal.",
        epilog="Exit status: 0 done, 1 failed, 2 bad usage, 130 interrupted.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    server.add_verbs(verbs)
    library.add_verbs(verbs)
    chat.add_verbs(verbs)
    completion.add_verbs(verbs)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "mlxweb") -> int:
    """Run the command; returns the exit status (the console script exits with it)."""
    import argcomplete

    completing = "_ARGCOMPLETE" in os.environ
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["completion"] and not completing:
            from mlxweb.cli import completion

            return completion.print_script(args_list[1:], prog)  # needs no Django
        # From a real command line, re-run with OpenBLAS preloaded (before MLX is loaded).
        bootstrap(_reexec_argv() if argv is None and not completing else None)
        from django.db import DatabaseError
        parser = build_parser(prog)
        argcomplete.autocomplete(parser)
        try:
            args = parser.parse_args(args_list)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
        handler: Handler = args.handler
        try:
            return handler(args, _verb_tokens(args_list, args.verb))
        except SystemExit as e:  # a Django command's own exit (`serve --port 0`: 2)
            return e.code if isinstance(e.code, int) else EXIT_FAILURE
        except DatabaseError as e:
            raise CLIError(
                f"the database is not ready ({e}): `mlxweb serve` or `manage.py migrate` "
                "creates it"
            ) from None
    except CLIError as e:
        print(f"mlxweb: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        # The reader went away (`mlxweb list | head`): no traceback, and none at exit either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\nmlxweb: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _verb_tokens(argv: list[str], verb: str) -> list[str]:
    """The arguments after the verb, as typed (the library verbs hand them to manage.py)."""
    return argv[argv.index(verb) + 1 :] if verb in argv else []


def verb_parser(
    verbs: Any, name: str, handler: Handler, *, help: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A verb's subparser that dispatches to `handler`."""
    parser: argparse.ArgumentParser = verbs.add_parser(name, help=help, description=help, **kwargs)
    parser.set_defaults(handler=handler)
    return parser
