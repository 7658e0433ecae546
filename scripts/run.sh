#!/usr/bin/env bash
# The README's run command: set up (idempotent), then start netwatchd with the given flags.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/bootstrap.sh"
exec "$REPO/.venv/bin/netwatchd" "$@"
