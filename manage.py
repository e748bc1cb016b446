#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    from mlxweb.config import ConfigError, load_config
    from mlxweb.launcher import ensure_fast_blas
    from mlxweb.paths import prepare_data_folder

    try:
        config = load_config()  # fail with a message, not a traceback from deep inside settings
    except ConfigError as e:
        print(f"mlxweb: the configuration is invalid:\n{e}", file=sys.stderr)
        sys.exit(2)
    # Folders and the secret key, before anything (the web process, its job worker) reads them.
    prepare_data_folder(config.server)
    ensure_fast_blas(sys.argv)
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
