# Shared by scripts/run and scripts/test. Sourced, not run.

# A Python >= 3.12 (Django 6 needs it): $MLXWEB_PYTHON, then the usual names, then pyenv's.
find_python() {
  local candidates=()
  [ -n "${MLXWEB_PYTHON:-}" ] && candidates+=("$MLXWEB_PYTHON")
  candidates+=(python3.13 python3.12 python3)
  for dir in "$HOME"/.pyenv/versions/3.1[2-9]* /opt/homebrew/bin /usr/local/bin; do
    [ -x "$dir/bin/python3" ] && candidates+=("$dir/bin/python3")
    [ -x "$dir/python3.12" ] && candidates+=("$dir/python3.12")
    [ -x "$dir/python3.13" ] && candidates+=("$dir/python3.13")
  done
  for py in "${candidates[@]}"; do
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      command -v "$py" 2>/dev/null || echo "$py"
      return 0
    fi
  done
  echo "mlxweb needs Python 3.12 or newer; none found. Install one, or set MLXWEB_PYTHON." >&2
  return 1
}

# .venv with the pinned dependencies; reinstalls only when pyproject.toml changed.
# $1: the extra to install ("" or "test").
ensure_venv() {
  local extra="${1:-}" python stamp
  if [ ! -x .venv/bin/python ]; then
    python=$(find_python)
    echo "Creating .venv with $python"
    "$python" -m venv .venv
  fi
  stamp=".venv/.mlxweb-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)${extra:+-$extra}"
  if [ ! -f "$stamp" ]; then
    echo "Installing mlxweb and its pinned dependencies into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # Packages built from source (llama-cpp-python, in the test extra) use every core.
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
      .venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
    rm -f .venv/.mlxweb-installed-*
    touch "$stamp"
  fi
}

# On Linux, OpenBLAS makes MLX's dense float32 matmuls ~30x faster than the reference BLAS that
# the mlx-cpu wheel bundles (manage.py preloads it when present). Best effort: root and apt only.
ensure_openblas() {
  [ "$(uname -s)" = Linux ] || return 0
  ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing OpenBLAS (libopenblas0-pthread)"
    apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; } \
      || echo "Could not install OpenBLAS; MLX will use its bundled reference BLAS." >&2
  fi
}

# The python tool (issue 11) runs code only inside bubblewrap; without it the tool is unavailable.
# Best effort: root and apt only.
ensure_bubblewrap() {
  [ "$(uname -s)" = Linux ] || return 0
  command -v bwrap >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing bubblewrap (the Python tool's sandbox)"
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
      || echo "Could not install bubblewrap; the python tool will be unavailable." >&2
  fi
}
