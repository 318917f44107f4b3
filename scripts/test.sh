#!/usr/bin/env bash
# The whole test suite: installs what is missing, makes sure PostgreSQL and Redis answer, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
DISTILL_INSTALL_BROWSER=1 bash scripts/install.sh

# This kind of machine starts PostgreSQL and Redis before a session; start them if they are not up.
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi

# Types first (strict on app/ and worker/distill/, [tool.mypy] in pyproject.toml): about 20 s cold.
python3 -m mypy
python3 -m pytest "$@"
