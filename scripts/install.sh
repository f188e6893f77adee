#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine, CI and the Docker image:
# Debian packages, the venv with the pinned Python packages, Horovod from its sdist (cached), asrflow.
# A second run takes seconds: every step checks before it works.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${ASRFLOW_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
export ASRFLOW_CACHE=${ASRFLOW_CACHE:-$HOME/.cache/asrflow}

APT_PACKAGES=(
  sox libsox-fmt-all libsndfile1                       # resampling, audio formats
  espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts  # embedded corpus voices
  wordnet-base fortunes-min                            # embedded corpus sentences
  build-essential cmake git                            # the Horovod build
  slurm-wlm munge slurmdbd mariadb-server-core         # the cluster profile's test cluster (sacct needs slurmdbd)
  openssh-server openssh-client iproute2 procps        # multi-host horovodrun test (network namespaces)
)

step() { printf '\n== %s\n' "$*"; }

step "Debian packages"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "all ${#APT_PACKAGES[@]} present"
fi

# Free space a fresh venv needs: PyPI's Linux torch is the CUDA build, and with its nvidia-* wheels the
# venv holds 6.0 GB; pip also keeps the downloaded wheels (~3.5 GB) in its temp folder until they are
# installed. Checked before pip starts, so a small disk stops here with the numbers, not halfway
# through an install with "[Errno 28] No space left on device".
VENV_NEEDS_GB=${ASRFLOW_VENV_NEEDS_GB:-10}
free_gb() { df -Pk "$1" | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }
check_space() {  # check_space FOLDER GB WHAT
  local have
  # a build chroot without /proc can have no mount table for df: then there is nothing to check against
  have=$(free_gb "$1" 2>/dev/null) && [ -n "$have" ] || { echo "(free space of $1 unknown: not checked)"; return 0; }
  if awk -v h="$have" -v n="$2" 'BEGIN {exit !(h < n)}'; then
    echo "asrflow install: $3 needs about $2 GB free on the file system of $1; it has $have GB." >&2
    echo "  Free space there, or put the venv on a larger disk (ASRFLOW_VENV=/big/disk/venv make install)." >&2
    exit 1
  fi
}

step "virtual environment $VENV"
stamp="$VENV/.asrflow-requirements.sha256"
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  mkdir -p "$(dirname "$VENV")"
  check_space "$(dirname "$VENV")" "$VENV_NEEDS_GB" "the virtual environment (torch with its CUDA libraries)"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  "$PY" -m pip install -q -r scripts/requirements.txt
  echo "$want" > "$stamp"
else
  echo "pinned requirements already installed"
fi

step "Horovod 0.28.1 (built from the sdist, wheel cached in $ASRFLOW_CACHE/wheels)"
if "$PY" -c 'import horovod.torch' 2>/dev/null; then
  echo "horovod.torch imports"
else
  PY="$PY" bash scripts/build_horovod.sh
fi

if [ "${ASRFLOW_INSTALL_PACKAGE:-1}" = 0 ]; then
  # The Dockerfile's dependency layer: everything but the package, so a source change reuses it.
  echo "asrflow itself skipped (ASRFLOW_INSTALL_PACKAGE=0)"; exit 0
fi

step "asrflow (editable)"
"$PY" -c 'import asrflow' 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c 'import asrflow, horovod.torch as hvd, mlflow, snakemake; print("asrflow ready:", "horovod gloo", hvd.gloo_built(), "| mlflow", mlflow.__version__)'
