"""Where the command writes: rich consoles on stdout (results) and stderr (bars, notes).

Made on each use, so they write to whatever sys.stdout / sys.stderr are then (tests capture
them); colour and live bars only on a terminal, which rich detects.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Tables piped to another program get this width (rich's default 80 squeezes their columns).
PIPED_WIDTH = 200


def console() -> Console:
    """Results: tables and replies."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)


def notes() -> Console:
    """Progress bars and one-line notes (which path `run` took), kept out of the results."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    """One dim line on stderr."""
    notes().print(text, style="dim", markup=False)


def size(n: int) -> str:
    """Bytes as the pages show them ("5.0 MB"), with a plain space for the terminal."""
    from django.template.defaultfilters import filesizeformat

    return str(filesizeformat(n)).replace("\xa0", " ")
