#!/usr/bin/env bash
# The test suite. Tests start the services they need themselves (mlflow server, HTTP mirror, SLURM).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ASRFLOW_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest tests -v -p no:cacheprovider --timeout=1200 "$@"
