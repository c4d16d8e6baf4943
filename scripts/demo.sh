#!/usr/bin/env bash
# Install everything (Debian packages, then coreslice in .venv) and run the demo: an emulated
# machine boots a host and two slices at once.  Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup-venv.sh
exec .venv/bin/coreslice demo "$@"
