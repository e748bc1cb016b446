"""Start-up helpers that must run before anything imports mlx."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Debian's libopenblas0-pthread. MLX's CPU wheel bundles the reference BLAS; preloading
# OpenBLAS makes dense float32 matmuls ~30x faster (see shared ENGINE_FACTS), and it only
# takes effect if set before the process starts, hence the re-exec.
OPENBLAS_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"),
    Path("/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"),
)


def ensure_fast_blas(argv: list[str]) -> None:
    """Re-exec this process with OpenBLAS preloaded on Linux, once, when it is installed.

    MLXWEB_NO_OPENBLAS=1 turns this off (the benchmark uses it to compare).
    """
    if not sys.platform.startswith("linux") or os.environ.get("MLXWEB_NO_OPENBLAS") == "1":
        return
    if os.environ.get("MLXWEB_BLAS_PRELOADED") == "1":
        return
    blas = next((p for p in OPENBLAS_CANDIDATES if p.exists()), None)
    if blas is None:
        return
    env = dict(os.environ)
    env["MLXWEB_BLAS_PRELOADED"] = "1"
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{blas}:{preload}" if preload else str(blas)
    os.execve(sys.executable, [sys.executable, *argv], env)
