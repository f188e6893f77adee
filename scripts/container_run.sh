#!/usr/bin/env bash
# `podman run` for the asrflow image, with what this kind of VM needs; all arguments go to podman run:
#   scripts/container_run.sh -v "$PWD:/work" localhost/asrflow:latest --cores 2 --configfile /opt/asrflow/config/small.yaml
#
# Plain `podman run` fails on the project's VMs, twice: root there lacks CAP_SYS_RESOURCE, so the OCI
# runtime may not raise RLIMIT_NOFILE/RLIMIT_NPROC to podman's defaults (1048576: "setrlimit
# RLIMIT_NOFILE: Operation not permitted"); and the cgroups are a v1/v2 hybrid, which crun refuses
# ("cgroups in hybrid mode not supported"). So, where the plain run fails: runc (apt-get install runc),
# cgroupfs, and rlimits at or below what this shell has (RLIMIT_NPROC above 32768 was refused here
# even below the shell's hard limit). ASRFLOW_PODMAN_ARGS overrides the probe.
set -euo pipefail
if [ -z "${ASRFLOW_PODMAN_ARGS+x}" ]; then
  probe_image=${ASRFLOW_IMAGE:-localhost/asrflow:latest}
  if podman run --rm --entrypoint true "$probe_image" >/dev/null 2>&1; then
    ASRFLOW_PODMAN_ARGS=""
  else
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    ASRFLOW_PODMAN_ARGS="--runtime runc --cgroup-manager=cgroupfs --ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
  fi
fi
# shellcheck disable=SC2086
exec podman run --rm $ASRFLOW_PODMAN_ARGS "$@"
