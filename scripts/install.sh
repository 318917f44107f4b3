#!/usr/bin/env bash
# Installs everything distill needs on a fresh Debian machine (CPU): system packages, then the Python package.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# bubblewrap: the sandbox every stage child (a user's model) runs in (worker/sandbox.py).
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
if [ "${DISTILL_INSTALL_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "install: apt-get ${need_apt[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# torch first, pinned: an open range would pull a several-GB CUDA build; 2.13.0 is a CPU build on this disk.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
stamp=.distill/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || ! "$PY" -c 'import app, worker' 2>/dev/null; then
  "$PY" -m pip install -q -e '.[all,dev]'
  mkdir -p .distill && touch "$stamp"
fi
