"""GPU utilization and memory, sampled through NVML in a background thread while steps run.

On a CPU device (or without a usable NVML) the sampler does nothing and reports ``None``, which the
tables print as "n/a (cpu)".
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

NOT_AVAILABLE = "n/a (cpu)"


@dataclass
class GpuStats:
    util_mean: float          # % of time a kernel was running, averaged over samples
    util_max: float
    mem_used_max_mb: float    # device memory in use (all processes), max over samples
    mem_total_mb: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml_index(device_index: int) -> int:
    """NVML numbers all GPUs of the host; CUDA only the visible ones. torch knows the mapping."""
    try:
        import torch.cuda

        return int(torch.cuda._get_nvml_device_index(device_index))
    except Exception:  # older/newer torch without the helper, or no CUDA
        return device_index


class GpuSampler:
    """``start()``/``stop()`` around the measured steps; ``stop()`` returns GpuStats or None (no GPU)."""

    def __init__(self, device: Any = None, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.device_type = getattr(device, "type", str(device) if device is not None else "cpu")
        self.device_index = getattr(device, "index", None) or 0
        self.handle = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._util: list[float] = []
        self._mem: list[float] = []
        self._total = 0.0
        if self.device_type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(self.device_index))
                self._total = pynvml.nvmlDeviceGetMemoryInfo(self.handle).total / 2**20
            except Exception as exc:  # no driver library, no permission, ...
                log.warning("GPU utilization not available: %s", exc)
                self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _sample(self) -> None:
        util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        self._util.append(float(util.gpu))
        self._mem.append(mem.used / 2**20)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as exc:
                log.warning("NVML sampling stopped: %s", exc)
                return
            self._stop.wait(self.interval_s)

    def start(self) -> "GpuSampler":
        if not self.available:
            return self
        self._util, self._mem = [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> GpuStats | None:
        if not self.available or self._thread is None:
            return None
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        if not self._util:
            return None
        return GpuStats(util_mean=round(sum(self._util) / len(self._util), 1), util_max=max(self._util),
                        mem_used_max_mb=round(max(self._mem), 1), mem_total_mb=round(self._total, 1),
                        samples=len(self._util))


def format_util(util: float | None) -> str:
    return NOT_AVAILABLE if util is None else f"{util:.0f}%"
