#!/usr/bin/env bash
# The prepared GPU check (issue 10): one call on the lent GPU machine, <= 8 minutes on one H200.
#
#   here, once:  scripts/gpu_check.sh --fetch-wheels     # small wheels the GPU machine lacks -> .whl/
#   there:       bash scripts/gpu_check.sh               # run(command="bash scripts/gpu_check.sh", carry=[".whl"])
#   rehearsal:   bash scripts/gpu_check.sh --tiny        # here, on CPU, a few steps of small models
#
# It trains through the trainer's own loop, one process, no Horovod (asrflow.benchmark.gpu_check), on a
# synthetic corpus it writes itself, and prints the table (utt/s, audio-s/s, GPU util, peak GPU memory,
# loader-wait share) for fp32, fp16 + GradScaler and bf16, default model and a ~30M Conformer.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(soundfile==0.14.0 cffi==2.0.0 pycparser==2.23 psutil==7.1.3 nvidia-ml-py==13.615.71 pyyaml==6.0.3)

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$w"
  done
  ls -la .whl
  exit 0
fi

OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
if [ "${1:-}" = "--tiny" ]; then
  PY=${PY:-.venv/bin/python}
  ARGS=(--tiny --utterances 40 --steps 3 --warmup 1 --workers 1)
else
  PY=${PY:-python3}
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  ARGS=(--utterances 600 --steps 40 --warmup 5 --workers 4)
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 ASRFLOW_NO_HOROVOD=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout 470 "$PY" -m asrflow.benchmark.gpu_check --out "$OUT/gpu_check.md" --work /tmp/asrflow-gpu-check "${ARGS[@]}"
