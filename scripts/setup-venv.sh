#!/usr/bin/env bash
# Create .venv (if missing) and install coreslice into it, editable, with the given extras.
# Usage: scripts/setup-venv.sh [EXTRAS]      e.g. scripts/setup-venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup-venv: $py is older than Python 3.11 (or missing); install python3 >= 3.11" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e "$spec"
