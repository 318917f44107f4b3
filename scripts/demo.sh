#!/usr/bin/env bash
# One real distillation job, end to end, on the embedded default (SQLite, local folder, serverless broker):
# trains a small teacher, uploads it over HTTP, submits a job, follows it, downloads and checks the student.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec distill demo "$@"
