# asrflow image: the project's own install script is the one source of truth, so this image holds
# exactly what CI tests. CPU by default; for GPU clusters build with
#   docker build --build-arg BASE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 --build-arg HOROVOD_NCCL=1 -t asrflow:cuda .
# which builds Horovod with NCCL allreduce against the image's CUDA toolkit.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG HOROVOD_NCCL=0
ENV DEBIAN_FRONTEND=noninteractive \
    ASRFLOW_VENV=/opt/asrflow/.venv \
    ASRFLOW_HOROVOD_NCCL=${HOROVOD_NCCL} \
    PIP_NO_CACHE_DIR=1

# The CUDA base images have no python3-venv/pip; the slim Python image has them already.
RUN if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev python3-pip; \
    fi && apt-get update -qq && apt-get install -y -qq --no-install-recommends make git ca-certificates

WORKDIR /opt/asrflow
COPY scripts/ scripts/
COPY pyproject.toml README.md ./
COPY src/ src/
RUN bash scripts/install.sh && rm -rf /root/.cache/pip
COPY . .

ENV PATH=/opt/asrflow/.venv/bin:$PATH
WORKDIR /work
# `docker run -v $PWD:/work asrflow --cores 4` runs the workflow on the mounted folder.
ENTRYPOINT ["snakemake", "-s", "/opt/asrflow/Snakefile"]
CMD ["--cores", "all"]
