#!/usr/bin/env bash
# One training run of the default recipe with some options changed, on the prepared default data
# (after `make run`), launched like the train rule: how far a recipe gets in a fixed time budget.
#   scripts/probes/recipe_budget.sh NAME '{"time_budget_minutes": 5, "model": {"dropout": 0.0}}' [NP]
# Prints the dev loss/CER after every epoch; the run is in $PROBES/NAME (default /tmp/asrflow-probes).
# A model dict with a "name" replaces the default model, else it overrides some of its keys.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=$1; OVR=$2; NP=${3:-2}
OUT=${PROBES:-/tmp/asrflow-probes}/$NAME; rm -rf $OUT; mkdir -p $OUT
.venv/bin/python - "$OVR" > $OUT/params.json <<'PY'
import json, sys, yaml
cfg = yaml.safe_load(open("config/config.yaml"))
base = cfg["training"]["base"]; ovr = json.loads(sys.argv[1])
for k, v in ovr.items():
    if isinstance(v, dict) and isinstance(base.get(k), dict) and "name" not in v: base[k] = {**base[k], **v}
    else: base[k] = v
base["variant"] = "probe"; base.setdefault("seed", cfg["seed"])
print(json.dumps(base))
PY
export PATH=$PWD/.venv/bin:$PATH PYTHONPATH=$PWD/src
start=$(date +%s)
horovodrun -np $NP -H localhost:$NP --gloo python -m asrflow.train.run --manifest results/prep/truncated.jsonl \
  --plan ${PLAN:-results/prep/buckets.json} --vocab ${VOCAB:-results/prep/vocab.json} --cmvn results/prep/cmvn.json --noise results/noise/manifest.jsonl \
  --out-dir $OUT --experiment probes --tracking-uri=sqlite:///$OUT/mlflow.db --log-dir $OUT/ranks \
  --params $OUT/params.json > $OUT/log.txt 2>&1 || echo FAILED
echo "$NAME wall $(( $(date +%s) - start )) s"
grep -E "dev loss|world:" $OUT/log.txt | sed -E 's/^.*rank0 INFO //' | tail -20
