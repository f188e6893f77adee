# asrflow image: the project's own install script is the one source of truth, so this image holds
# exactly what CI tests.
#
# `make image` (scripts/build_image.sh) builds it with buildah and no registry: the base is a Debian
# bookworm root file system made here with mmdebstrap (or BASE=... given), the Horovod wheel cache and
# the build host's pip configuration are mounted into the build (nothing of them stays in the image).
# With a registry, plain `docker build .` works too (BASE defaults to the Python slim image).
#
# CUDA variant for GPU clusters:
#   make image BASE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 HOROVOD_NCCL=1 IMAGE=asrflow:cuda
# builds Horovod with NCCL allreduce against the image's CUDA toolkit.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG HOROVOD_NCCL=0
ENV DEBIAN_FRONTEND=noninteractive \
    ASRFLOW_VENV=/opt/asrflow/.venv \
    ASRFLOW_HOROVOD_NCCL=${HOROVOD_NCCL} \
    PIP_NO_CACHE_DIR=1

# Debian minbase (mmdebstrap) and the CUDA base images have no Python; Debian's python3 has no
# ensurepip without python3-venv. The slim Python image has both already.
RUN if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev python3-pip; \
    fi && apt-get update -qq && apt-get install -y -qq --no-install-recommends make git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Build-time only, given by scripts/build_image.sh: a pip.conf holding the build host's pip settings
# (its local indexes are mounted read-only at the same paths), and a pip cache folder mounted from the
# host. Empty: pip uses PyPI and no cache.
ARG ASRFLOW_PIP_CONF=
ARG ASRFLOW_PIP_CACHE=

WORKDIR /opt/asrflow
# The dependency layer: Debian packages, the pinned venv and Horovod. It depends on these three files
# only, so a source change rebuilds none of it. Horovod comes from the wheel cache
# (/root/.cache/asrflow, a build volume under make image) when a wheel for this torch is there.
COPY scripts/install.sh scripts/build_horovod.sh scripts/requirements.txt scripts/
RUN if [ -n "$ASRFLOW_PIP_CONF" ]; then export PIP_CONFIG_FILE="$ASRFLOW_PIP_CONF"; fi; \
    if [ -n "$ASRFLOW_PIP_CACHE" ]; then unset PIP_NO_CACHE_DIR; export PIP_CACHE_DIR="$ASRFLOW_PIP_CACHE"; fi; \
    ASRFLOW_INSTALL_PACKAGE=0 bash scripts/install.sh && rm -rf /var/lib/apt/lists/* \
    && { mountpoint -q /root/.cache/asrflow || rm -rf /root/.cache/asrflow; }

# The source (scripts/build_image.sh builds from `git archive HEAD`: the committed tree), then asrflow
# itself (editable, seconds: every other step of install.sh finds its work done).
COPY . .
RUN if [ -n "$ASRFLOW_PIP_CONF" ]; then export PIP_CONFIG_FILE="$ASRFLOW_PIP_CONF"; fi; \
    bash scripts/install.sh && rm -rf /var/lib/apt/lists/* /root/.cache/pip

ENV PATH=/opt/asrflow/.venv/bin:$PATH
WORKDIR /work
# `podman run -v $PWD:/work asrflow --cores 4` runs the workflow on the mounted folder
# (scripts/container_run.sh has the options this VM needs).
ENTRYPOINT ["snakemake", "-s", "/opt/asrflow/Snakefile"]
CMD ["--cores", "all"]
