#!/usr/bin/env bash
# The README's test command: set up everything (idempotent), lint, then run the whole suite as root.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/bootstrap.sh"
cd "$REPO"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
