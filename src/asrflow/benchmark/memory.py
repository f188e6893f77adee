"""Peak memory of the training steps: resident set size on CPU, the CUDA caching allocator on a GPU.

The peak RSS of a process (``VmHWM``) only ever grows; on Linux writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so the peak can be taken over the training
steps alone (model building and audio loading excluded). Where that is not allowed the peak is the
whole process's, which the report says (``peak_reset: false``). Memory freed by one configuration
stays with the allocator, so configurations are compared in fresh processes (the runner does).
"""
from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

MB = 1024 * 1024


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / MB if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryStats:
    rss_before_mb: float
    peak_rss_mb: float
    peak_reset: bool
    cuda_max_allocated_mb: float | None = None
    cuda_max_reserved_mb: float | None = None

    @property
    def step_increase_mb(self) -> float:
        return max(0.0, self.peak_rss_mb - self.rss_before_mb)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"step_increase_mb": round(self.step_increase_mb, 1)}


class MemoryProbe:
    """``start()`` before the training steps, ``stop()`` after them."""

    def __init__(self, device) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.device = device
        self.before = 0.0
        self.reset = False

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = rss_mb()
        self.reset = reset_peak_rss()

    def stop(self) -> MemoryStats:
        stats = MemoryStats(rss_before_mb=round(self.before, 1), peak_rss_mb=round(peak_rss_mb(), 1), peak_reset=self.reset)
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            stats.cuda_max_allocated_mb = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
            stats.cuda_max_reserved_mb = round(torch.cuda.max_memory_reserved(self.device) / MB, 1)
        return stats


class SavedTensorMeter:
    """Bytes of activations autograd keeps for the backward pass (distinct storages, parameters excluded).

    Exact and device-independent, unlike RSS: this is the memory gradient checkpointing trades for
    recomputation. Checkpointed layers keep only their inputs (saved through the meter); what they
    would have saved inside goes to the checkpoint's own hooks and is recomputed instead.

        with SavedTensorMeter(model.parameters()) as meter:
            loss = model(...)
        meter.bytes
    """

    def __init__(self, exclude: Iterable[Any] = ()):
        self.excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, int] = {}
        self._ctx = None

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.excluded:
                self.storages.setdefault(ptr, storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers)
            pass
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self) -> "SavedTensorMeter":
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def checkpointing_comparison(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """What gradient checkpointing saves (and costs): memory stats and throughput of both runs.

    The saving is taken on the activations kept for backward where measured (exact, any device), else on
    the GPU allocator's peak, else on the RSS increase during the steps.
    """
    key = next(k for k in ("saved_activations_mb", "cuda_max_allocated_mb", "step_increase_mb")
               if off.get(k) is not None and on.get(k) is not None)
    saved = off[key] - on[key]
    out = {"basis": key, "saved_mb": round(saved, 1),
           "saved_fraction": round(saved / off[key], 4) if off[key] else None}
    if off.get("utt_per_s") and on.get("utt_per_s"):
        out["slowdown"] = round(off["utt_per_s"] / on["utt_per_s"], 3)
    return out
