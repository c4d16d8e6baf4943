#!/usr/bin/env bash
# Install what the tests need (Debian packages, then coreslice + test deps in .venv) and run the
# whole test suite: unit tests, then end-to-end boots on the emulated machine.  Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup-venv.sh test
exec .venv/bin/python -m pytest -ra "$@"
