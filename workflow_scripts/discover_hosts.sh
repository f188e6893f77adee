#!/usr/bin/env bash
# Host discovery for elastic Horovod (horovodrun --host-discovery-script): prints one `host:slots` line
# per host that may run workers right now. horovodrun calls it every few seconds; hosts that appear are
# added to the training, hosts that disappear are drained. The first source that applies:
#   1. $ASRFLOW_HOSTS_FILE: a file you (or a cluster hook) edit while training runs, one `host:slots`
#      (or `host`, meaning one slot) per line, `#` comments; a missing file means no hosts for now;
#   2. inside a SLURM allocation: its nodes and tasks per node (src/asrflow/launch.py);
#   3. this machine: localhost:<number of CPUs>.
set -euo pipefail

if [[ -n "${ASRFLOW_HOSTS_FILE:-}" ]]; then
  [[ -r "$ASRFLOW_HOSTS_FILE" ]] || exit 0
  sed -E -e 's/#.*//' -e 's/^[[:space:]]+|[[:space:]]+$//g' "$ASRFLOW_HOSTS_FILE" | grep -E '^[A-Za-z0-9._-]+(:[0-9]+)?$' \
    | sed -E 's/^([^:]+)$/\1:1/' || true
elif [[ -n "${SLURM_JOB_ID:-}" || -n "${SLURM_JOB_NODELIST:-}" ]]; then
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # `-np N -H a:4,b:4` -> a:4 and b:4 on their own lines
  "${PYTHON:-python}" "$here/horovod_hosts.py" 1 unused | sed -e 's/.*-H //' | tr ',' '\n'
else
  echo "localhost:$(nproc)"
fi
