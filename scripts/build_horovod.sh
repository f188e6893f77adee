#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist against torch 2.x and cache the wheel.
# 0.28.1 (the last release) pins CMAKE_CXX_STANDARD 14 where torch>=2.1 needs C++17 (horovod PR #3998,
# merged upstream but never released), so the two CMakeLists are patched before building.
set -euo pipefail
PY=${PY:-python3}
CACHE=${ASRFLOW_CACHE:-$HOME/.cache/asrflow}
VERSION=0.28.1
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS" "$CACHE/sdist"

# The CUDA build (GPU tensors staged through host memory) only where a GPU is there to use it, or when
# asked for (ASRFLOW_HOROVOD_CUDA=1: building on a GPU-less login node for GPU nodes). A CUDA toolkit
# alone is no reason: on a CPU machine that has nvcc, the CPU wheel is the one the image build
# (scripts/build_image.sh, which mounts this cache) also uses, so Horovod is compiled once, not twice.
variant=cpu
if [ "${ASRFLOW_HOROVOD_CUDA:-0}" = 1 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then variant=cuda; fi
fi
[ "${ASRFLOW_HOROVOD_CPU_ONLY:-0}" = 1 ] && variant=cpu
torch_ver=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
[ "${ASRFLOW_HOROVOD_NCCL:-0}" = 1 ] && variant=nccl
tag="$WHEELS/horovod-$VERSION-torch$torch_ver-$variant"
mkdir -p "$tag"

if ls "$tag"/horovod-*.whl >/dev/null 2>&1; then
  echo "horovod: using cached wheel $(ls "$tag"/horovod-*.whl)"
else
  sdist="$CACHE/sdist/horovod-$VERSION.tar.gz"
  [ -f "$sdist" ] || "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$CACHE/sdist"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$sdist" -C "$work"
  src="$work/horovod-$VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || { echo "horovod: C++17 patch did not apply" >&2; exit 1; }
  if [ "$variant" = cpu ]; then
    # With torch's CUDA wheels, Horovod's FindPytorch calls torch "CUDA" whenever torch finds a CUDA_HOME
    # (any nvcc on PATH, e.g. a stray pip one), and then builds its torch extension as a CUDA extension
    # that needs the CUDA toolkit's cudart and headers. The CPU wheel needs none of it: torch counts as
    # CPU-only for this build.
    sed -i 's/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$/&\nif("$ENV{ASRFLOW_HOROVOD_CPU_BUILD}" STREQUAL "1")\n    set(Pytorch_CUDA FALSE)\nendif()/' \
      "$src/cmake/Modules/FindPytorch.cmake"
    grep -q 'ASRFLOW_HOROVOD_CPU_BUILD' "$src/cmake/Modules/FindPytorch.cmake" || { echo "horovod: CPU-build patch did not apply" >&2; exit 1; }
    export ASRFLOW_HOROVOD_CPU_BUILD=1
  fi
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
         HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO
  if [ "$variant" = cuda ]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} HOROVOD_CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  fi
  if [ "${ASRFLOW_HOROVOD_NCCL:-0}" = 1 ]; then
    # GPU clusters (the CUDA Docker build): NCCL allreduce. torch's CUDA wheels ship NCCL inside
    # nvidia-nccl-*; point Horovod at it.
    export HOROVOD_GPU_OPERATIONS=NCCL
    nccl_dir=$("$PY" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
    if [ -n "$nccl_dir" ] && [ -d "$nccl_dir/include" ]; then
      export HOROVOD_NCCL_INCLUDE="$nccl_dir/include" HOROVOD_NCCL_LIB="$nccl_dir/lib"
      [ -e "$nccl_dir/lib/libnccl.so" ] || ln -sf "$(ls "$nccl_dir"/lib/libnccl.so.* | head -1)" "$nccl_dir/lib/libnccl.so"
    fi
  fi
  export MAKEFLAGS="-j$(nproc)"
  (cd "$src" && "$PY" -m pip wheel --no-deps --no-build-isolation -w "$tag" .)
fi
"$PY" -m pip install --no-deps --force-reinstall -q "$tag"/horovod-*.whl
"$PY" -c 'import horovod.torch as hvd; print("horovod", hvd.__version__ if hasattr(hvd, "__version__") else "", "gloo built:", hvd.gloo_built(), "nccl built:", hvd.nccl_built())'
