"""`mlxweb completion bash|zsh|fish`: argcomplete's script for the shell.

The script calls `mlxweb` itself with argcomplete's environment (`_ARGCOMPLETE`, `COMP_LINE`,
`COMP_POINT`), so completions always follow the real parser: verbs, options, choices and the
model ids of the catalogue.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

SHELLS = ("bash", "zsh", "fish")


def add_verbs(verbs: Any) -> None:
    from mlxweb.cli import verb_parser

    parser = verb_parser(
        verbs,
        "completion",
        _completion,
        help="print a shell completion script (source <(mlxweb completion bash))",
    )
    parser.add_argument("shell", choices=SHELLS)


def _completion(args: argparse.Namespace, tokens: list[str]) -> int:
    return _print(args.shell, "mlxweb")


def print_script(argv: list[str], prog: str) -> int:
    """The verb on its own, without setting Django up: the script does not depend on it."""
    parser = argparse.ArgumentParser(prog=f"{prog} completion")
    parser.add_argument("shell", choices=SHELLS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    return _print(args.shell, "mlxweb")


def _print(shell: str, executable: str) -> int:
    import argcomplete

    sys.stdout.write(argcomplete.shellcode([executable], shell=shell))
    return 0
