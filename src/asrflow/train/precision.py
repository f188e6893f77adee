"""Mixed precision: choosing a dtype, autocast and the GradScaler. The step that skips non-finite
updates is the trainer's one ``training_step``.

Policy of ``resolve_precision``:

=========  ======================  ==========================
setting    CUDA                    CPU
=========  ======================  ==========================
auto       fp16 + GradScaler       fp32 (see below)
fp16       fp16 + GradScaler       error (see below)
bf16       bf16, no scaler [#]_    bf16, no scaler
fp32       no autocast             no autocast
=========  ======================  ==========================

.. [#] error on a GPU without bf16 support.

fp16 on CPU is refused rather than silently downgraded: CPU autocast's fp16 op coverage is thin and
slow, and a silent fallback would make an explicit config lie about what ran. Use "auto" for a
config that should run anywhere.

"auto" keeps fp32 on CPUs because bf16 autocast was slower there in every measurement, with or
without native bf16: 4.5x slower on an AVX2 machine (emulated bf16), and 1.26x (0.294 vs 0.234 s per
step, Conformer d96x4) and 1.11x (d144x6) slower on a Sapphire Rapids with AMX-BF16, whose tiles these
small matrices do not fill while every op pays the casts. "bf16" still forces it (and the benchmark
measures it as "mixed").
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _device(device: str | torch.device) -> torch.device:
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); the benchmark reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_precision(setting: str, device: str | torch.device) -> tuple[torch.dtype | None, bool]:
    """-> (autocast dtype or None for plain fp32, whether to use a GradScaler)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {setting!r}")
    dev = _device(device)
    if setting == "fp32":
        return None, False
    if dev.type == "cuda":
        if setting in ("auto", "fp16"):
            return torch.float16, True
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("precision 'bf16' requested but this GPU does not support bfloat16; use 'fp16' or 'auto'")
        return torch.bfloat16, False
    if dev.type == "cpu":
        if setting == "fp16":
            raise ValueError("precision 'fp16' is not supported on CPU (use 'bf16', 'fp32' or 'auto')")
        if setting == "auto":  # measured slower than fp32 on CPUs, native bf16 or not (module doc)
            return None, False
        return torch.bfloat16, False
    # other backends (mps, xpu, ...): only what was asked for explicitly; auto stays safe in fp32
    if setting == "auto":
        return None, False
    return (torch.float16, True) if setting == "fp16" else (torch.bfloat16, False)


def autocast_context(device: str | torch.device, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast`` for ``dtype``; a no-op context for ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(device).type, dtype=dtype)


def make_grad_scaler(enabled: bool, device: str | torch.device) -> torch.amp.GradScaler:
    """A GradScaler; disabled ones are pass-throughs, so the training loop needs no branches."""
    return torch.amp.GradScaler(_device(device).type, enabled=enabled)
