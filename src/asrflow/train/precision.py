"""Mixed precision: choosing a dtype, autocast, GradScaler, and an optimizer step that skips non-finite updates.

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
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

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


@dataclass
class StepStats:
    """Counters kept by ``step_with_nonfinite_guard``."""

    steps: int = 0
    skipped_nonfinite_loss: int = 0
    skipped_nonfinite_grad: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_nonfinite_loss + self.skipped_nonfinite_grad


def step_with_nonfinite_guard(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: Iterable[torch.nn.Parameter],
    max_grad_norm: float | None,
    stats: StepStats | None = None,
    after_backward: Callable[[], None] | None = None,
    step_context: Callable[[], ContextManager] | None = None,
) -> tuple[bool, float]:
    """Backward, unscale, clip, and step unless the loss or the gradient norm is non-finite.

    Returns (stepped, grad_norm before clipping; NaN when the loss was non-finite). Gradients are
    zeroed at the end either way, so a skipped step leaves weights, optimizer state and gradients as if
    the batch never happened. With an fp16 GradScaler a skip also backs the scale off (an overflow is
    exactly what the scaler expects to see now and then).

    Backward always runs, even for a non-finite loss: in data-parallel training every rank must join
    the same gradient all-reduce, and the non-finite values it spreads make every rank skip together.
    For Horovod pass ``after_backward=optimizer.synchronize`` and ``step_context=optimizer.skip_synchronize``
    so gradients are reduced before they are unscaled and clipped. One optimizer update per call (no
    gradient accumulation).
    """
    stats = stats if stats is not None else StepStats()
    params = [p for p in params if p.requires_grad]
    scaler = scaler if scaler is not None else make_grad_scaler(False, "cpu")
    loss_finite = bool(torch.isfinite(loss.detach()).all())

    scaler.scale(loss).backward()
    if after_backward is not None:
        after_backward()
    scaler.unscale_(optimizer)
    max_norm = float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else math.inf
    # error_if_nonfinite=False: a non-finite norm is reported, not raised; the grads are then discarded
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False))

    stepped = loss_finite and math.isfinite(grad_norm)
    if stepped:
        with (step_context() if step_context is not None else contextlib.nullcontext()):
            scaler.step(optimizer)  # still skips by itself if unscale_ found inf/nan
        stats.steps += 1
    elif not loss_finite:
        stats.skipped_nonfinite_loss += 1
        grad_norm = float("nan")
    else:
        stats.skipped_nonfinite_grad += 1
    scaler.update()  # after unscale_, this backs the scale off if inf/nan was found, grows it otherwise
    optimizer.zero_grad(set_to_none=True)
    return stepped, grad_norm
