#!/usr/bin/env bash
# `make image`: build the asrflow image from the Dockerfile with buildah, no registry needed.
#
#   BASE     the base image; unset: localhost/asrflow-base:$SUITE, made here with mmdebstrap from the
#            Debian archive when it does not exist yet (bookworm: Python 3.11, as the pins need)
#   IMAGE    the tag to build (localhost/asrflow:latest)
#   HOROVOD_NCCL=1   the CUDA variant's Horovod (with a CUDA BASE)
#   FORCE=1  rebuild even when the image already holds this commit and these dependency files
#   NO_CACHE=1  and without buildah's layer cache (every step runs; the wheel and pip caches still count)
#
# The build context is `git archive HEAD`: the image holds the committed tree, never uncommitted edits.
# Mounted into the build, read-only unless said otherwise, and kept out of the image:
#   * $ASRFLOW_CACHE (~/.cache/asrflow, read-write) at /root/.cache/asrflow: the Horovod wheel cache of
#     scripts/build_horovod.sh, so a rebuild does not compile Horovod again;
#   * $ASRFLOW_CACHE/pip-image (read-write): pip's download cache for what comes from PyPI;
#   * this machine's pip configuration (`pip config list`, PIP_* variables included) as one pip.conf,
#     and the local folders it names (find-links, file:// indexes, constraints) at the same paths;
#     its CA bundle (`cert`: here it holds the CA of the TLS proxy PyPI is reached through) as a copy
#     beside that pip.conf.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
IMAGE=${IMAGE:-localhost/asrflow:latest}
SUITE=${SUITE:-bookworm}
BASE=${BASE:-}
HOROVOD_NCCL=${HOROVOD_NCCL:-0}
WORK=${ASRFLOW_IMAGE_WORK:-/var/tmp/asrflow-image}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
export ASRFLOW_CACHE=${ASRFLOW_CACHE:-$HOME/.cache/asrflow}
NICE=(nice -n "${NICE:-15}")
mkdir -p "$WORK" "$ASRFLOW_CACHE/pip-image"

say() { printf '\n== %s\n' "$*"; }
need() { command -v "$1" >/dev/null || { echo "make image needs $1 (apt-get install buildah podman mmdebstrap runc)" >&2; exit 1; }; }

# The tools, from Debian (buildah builds, podman runs, runc is the runtime scripts/container_run.sh
# falls back to, mmdebstrap makes the base).
tools=(buildah podman runc mmdebstrap)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})) && command -v apt-get >/dev/null; then
  say "Debian packages ${missing[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
need buildah

commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] \
  || echo "note: the working tree has uncommitted changes; the image holds the commit ${commit:0:12} only"

# --- the base -----------------------------------------------------------------------------------
if [ -z "$BASE" ]; then
  BASE=localhost/asrflow-base:$SUITE
  if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    need mmdebstrap
    say "base $BASE: Debian $SUITE minbase from $DEBIAN_MIRROR (mmdebstrap)"
    tarball="$WORK/base-$SUITE.tar"
    "${NICE[@]}" mmdebstrap --variant=minbase --include=ca-certificates "$SUITE" "$tarball" \
      "deb $DEBIAN_MIRROR $SUITE main" "deb $DEBIAN_MIRROR $SUITE-updates main" \
      "deb $DEBIAN_SECURITY $SUITE-security main"
    if command -v podman >/dev/null; then
      podman import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE"
    else
      ctr=$(buildah from scratch)
      buildah add "$ctr" "$tarball" /
      buildah config --cmd /bin/bash "$ctr"
      buildah commit --rm "$ctr" "$BASE"
    fi
    rm -f "$tarball"
  fi
fi
say "base $BASE"

# --- up to date? ------------------------------------------------------------------------------------
# The files the dependency layer is built from, as committed (the context is HEAD).
deps=$( { for f in Dockerfile scripts/install.sh scripts/build_horovod.sh scripts/requirements.txt; do git show "HEAD:$f"; done; \
          echo "$BASE $HOROVOD_NCCL"; } | sha256sum | cut -c1-16)
label() {
  buildah inspect --type image "$IMAGE" 2>/dev/null \
    | python3 -c 'import json, sys; print((json.load(sys.stdin)["OCIv1"]["config"].get("Labels") or {}).get(sys.argv[1], ""))' "$1" 2>/dev/null || true
}
if [ "${FORCE:-0}" != 1 ] && [ "${NO_CACHE:-0}" != 1 ] && [ "$(label org.opencontainers.image.revision)" = "$commit" ] && [ "$(label asrflow.deps)" = "$deps" ]; then
  say "$IMAGE is up to date (commit ${commit:0:12}, dependencies $deps); FORCE=1 rebuilds"
  exit 0
fi

# --- the context: the committed tree ----------------------------------------------------------------
ctx="$WORK/context"
rm -rf "$ctx" && mkdir -p "$ctx"
git archive --format=tar HEAD | tar -x -C "$ctx"

# --- this machine's pip configuration, for the build ------------------------------------------------
pipdir="$WORK/pip"
mkdir -p "$pipdir"
PYTHON=${PYTHON:-python3}
[ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
mounts=()
cat > "$pipdir/merge.py" <<'EOF'
import configparser, os, shutil, sys
# `pip config list` lines: `<section>.<option>='<value>'`; PIP_* variables show as `:env:.<option>`
# and override the files, as they do for pip itself.
sections, env = {}, {}
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    if not value:
        continue
    section, _, option = key.rpartition(".")
    value = value.strip("'\"")
    (env if section == ":env:" else sections.setdefault(section, {}))[option] = value
sections.setdefault("global", {}).update(env)
conf = configparser.ConfigParser()
mounts = set()
for section, options in sections.items():
    for option, value in list(options.items()):
        if option in ("cert", "client-cert") and os.path.isfile(value):
            # The host's CA bundle (it may hold a TLS proxy's CA that PyPI is reached through): a copy
            # beside this pip.conf, not mounted over the image's own bundle.
            copy = os.path.join(os.path.dirname(sys.argv[1]), option + ".pem")
            shutil.copyfile(value, copy)
            options[option] = os.path.join("/etc/asrflow-build-pip", option + ".pem")
            continue
        for token in value.split():
            path = token[len("file://"):] if token.startswith("file://") else token
            if not path.startswith("/") or not os.path.exists(path):
                continue
            path = path.rstrip("/")
            if os.path.basename(path) == "simple":  # a PEP 503 index: its files lie beside it
                path = os.path.dirname(path)
            mounts.add(path)
    conf[section] = options
with open(sys.argv[1], "w") as f:
    f.write("# The build host's pip configuration (scripts/build_image.sh), mounted into the build only.\n")
    conf.write(f)
for path in sorted(mounts):
    print(f"{path}:{path}:ro")
EOF
while IFS= read -r m; do mounts+=(-v "$m"); done < <("$PYTHON" -m pip config list 2>/dev/null | "$PYTHON" "$pipdir/merge.py" "$pipdir/pip.conf")
say "pip configuration for the build ($pipdir/pip.conf)"
grep -v '^#' "$pipdir/pip.conf" | sed '/^$/d'
mounts+=(-v "$pipdir:/etc/asrflow-build-pip:ro"
         -v "$ASRFLOW_CACHE:/root/.cache/asrflow"
         -v "$ASRFLOW_CACHE/pip-image:/var/cache/asrflow-pip")
printf '  mount %s\n' "${mounts[@]/#-v/}" | grep -v '^  mount $' || true

# --- build ---------------------------------------------------------------------------------------
say "buildah bud -> $IMAGE (commit ${commit:0:12})"
start=$(date +%s)
cache=(--layers); [ "${NO_CACHE:-0}" = 1 ] && cache=(--no-cache)
"${NICE[@]}" buildah bud --isolation chroot "${cache[@]}" -f "$ctx/Dockerfile" -t "$IMAGE" \
  --build-arg BASE="$BASE" --build-arg HOROVOD_NCCL="$HOROVOD_NCCL" \
  --build-arg ASRFLOW_PIP_CONF=/etc/asrflow-build-pip/pip.conf \
  --build-arg ASRFLOW_PIP_CACHE=/var/cache/asrflow-pip \
  --label org.opencontainers.image.revision="$commit" --label asrflow.deps="$deps" --label asrflow.base="$BASE" \
  "${mounts[@]}" "$ctx"
secs=$(( $(date +%s) - start ))
size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
say "$IMAGE built in ${secs}s, $size"
printf '%s %s commit=%s deps=%s base=%s build_s=%s size=%s\n' "$(date -u +%FT%TZ)" "$IMAGE" "$commit" "$deps" "$BASE" "$secs" "$size" >> "$WORK/builds.log"
