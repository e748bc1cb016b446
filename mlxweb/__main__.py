"""`python -m mlxweb`: the `mlxweb` command."""

from __future__ import annotations

import sys

from mlxweb.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m mlxweb"))
