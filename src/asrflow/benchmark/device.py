"""What the benchmark ran on: CPU model and cores, GPU (if any), library versions."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: str | None = None) -> str:
    """The ``model name`` of /proc/cpuinfo (first core), else what ``platform`` knows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (affinity / cgroup cpuset), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_info() -> dict[str, Any]:
    import torch

    from asrflow.train.precision import cpu_has_native_bf16

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores_total": os.cpu_count() or 1,
        "cpu_cores_usable": usable_cores(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "horovod": _version("horovod"),
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for the report: "AMD EPYC, 2 cores (of 2), no GPU; torch 2.11.0, horovod 0.28.1"."""
    cores = f"{info['cpu_cores_usable']} cores"
    if info.get("cpu_cores_total") and info["cpu_cores_total"] != info["cpu_cores_usable"]:
        cores += f" (of {info['cpu_cores_total']})"
    if "cpu_native_bf16" in info:
        cores += ", native bf16" if info["cpu_native_bf16"] else ", bf16 emulated"
    gpu = f"{info['gpu_count']}× {info['gpu_name']} (CUDA {info['cuda']})" if info.get("gpu_name") else "no GPU"
    load = f", load average {info['load_average_1m']} at start" if info.get("load_average_1m") is not None else ""
    return f"{info['cpu_model']}, {cores}, {gpu}; torch {info['torch']}, horovod {info['horovod']}{load}"
