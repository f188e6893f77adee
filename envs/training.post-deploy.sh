#!/usr/bin/env bash
# Snakemake runs this inside the freshly created training env: build Horovod from its sdist (cached).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY="$CONDA_PREFIX/bin/python" bash "$here/../scripts/build_horovod.sh"
