r"""CTC losses: plain, label-smoothed (correctly), and the reference post's constant mix (for comparison).

All take batch-first model outputs and return a ``CTCLossOutput`` (total loss plus its components, for
logging). Everything is computed in fp32 whatever the input dtype.

Label smoothing for CTC
-----------------------
For cross-entropy, training against the smoothed target ``q = (1-s)·onehot(y) + s·u`` (``u`` uniform
over ``V`` classes) gives ``CE(q, p) = (1-s)·CE(y, p) + s·(KL(u‖p) + log V)``. CTC has no per-frame
target, so the analogue keeps the CTC sequence loss and adds the uniform term per output frame:

    KL(u ‖ p_t) = Σ_v (1/V)·log((1/V) / p_t(v)) = -log V - (1/V)·Σ_v log p_t(v)

    R_b   = (1/T_b) · Σ_{t < T_b} KL(u ‖ p_{b,t})                 (real frames only, T_b = out_lens[b])
    CTC_b = -log Σ_{π ∈ B⁻¹(y_b)} Π_t p_{b,t}(π_t)                 (torch's ctc_loss, reduction="none")

    loss  = Σ_b w_b · [ (1-s)·CTC_b / max(|y_b|, 1) + s·R_b ] / Σ_b w_b     (reduction="mean")

The constant ``log V`` is dropped (no effect on gradients) so the term is 0 for a uniform posterior
and ≥ 0 otherwise. ``kind="confidence_penalty"`` uses the other KL direction,
``KL(p_t ‖ u) = Σ_v p_t(v)·log p_t(v) + log V = log V - H(p_t)`` (Pereyra et al. 2017's confidence
penalty, shifted to be ≥ 0). Note the two terms are normalized differently (CTC per target token, the
smoothing per frame), exactly like torch's ``reduction="mean"`` normalizes CTC.

What the reference post did, and why it is wrong: see ``ConstantMixCTCLoss``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none")
SMOOTHING_KINDS = ("kl_uniform", "confidence_penalty")


@dataclass
class CTCLossOutput:
    """``loss`` is what to backpropagate; ``ctc`` and ``smooth`` are its (already reduced) components,
    with ``loss = (1-s)·ctc + s·smooth`` for the smoothed loss."""

    loss: torch.Tensor
    ctc: torch.Tensor
    smooth: torch.Tensor
    adversary: torch.Tensor | None = None  # the voice adversary's cross-entropy, where one trains (train.adversary)


def frame_mask(out_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=out_lens.device)[None, :] < out_lens[:, None]


def smoothing_per_frame(log_probs: torch.Tensor, kind: str = "kl_uniform") -> torch.Tensor:
    """(B, T, V) fp32 log-probs -> (B, T) per-frame smoothing term (0 for a uniform posterior)."""
    log_v = math.log(log_probs.size(-1))
    if kind == "kl_uniform":
        return -log_v - log_probs.mean(-1)
    if kind == "confidence_penalty":
        return (log_probs.exp() * log_probs).sum(-1) + log_v
    raise ValueError(f"smoothing kind must be one of {SMOOTHING_KINDS}, got {kind!r}")


def _weighted_reduce(values: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weights is not None:
        values = values * weights
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    denom = weights.sum().clamp_min(1e-12) if weights is not None else values.new_tensor(values.numel())
    return values.sum() / denom


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _ctc_per_utterance(log_probs: torch.Tensor, out_lens: torch.Tensor, targets: torch.Tensor,
                       target_lens: torch.Tensor, blank: int, zero_infinity: bool) -> torch.Tensor:
    """Batch-first fp32 log-probs -> (B,) CTC negative log-likelihoods (unnormalized)."""
    return F.ctc_loss(log_probs.transpose(0, 1), targets, out_lens, target_lens, blank=blank,
                      reduction="none", zero_infinity=zero_infinity)


def _weights(weights: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32, device=device).reshape(-1)
    if w.numel() != batch:
        raise ValueError(f"got {w.numel()} utterance weights for a batch of {batch}")
    return w


class SmoothedCTCLoss(nn.Module):
    r"""``(1-s)·CTC + s·R``, the smoothing term ``R`` averaged over real frames (formula in the module doc).

    forward(log_probs (B, T, V), out_lens (B,), targets (B, S) padded or (ΣS,) concatenated,
    target_lens (B,), weights (B,) optional) -> CTCLossOutput.

    * ``reduction="mean"``: per utterance, CTC divided by target length and R averaged over its real
      frames; then a (weighted) mean over the batch. With ``s=0`` and no weights this is exactly
      ``F.ctc_loss(..., reduction="mean")``.
    * ``"sum"``: Σ_b w_b·[(1-s)·CTC_b + s·Σ_t KL_t]; ``"none"``: that per utterance, shape (B,).
    * Inputs are cast to fp32 (``.float()``) first, so fp16/bf16 inputs give the fp32 result.
    * ``zero_infinity``: an impossible alignment (target longer than the output allows) gives CTC 0 and
      no CTC gradient; its smoothing term still counts.
    * ``weights``: per-utterance weights (e.g. dialect class weights); "mean" divides by Σ w.
    """

    def __init__(self, blank: int = 0, smoothing: float = 0.1, reduction: str = "mean",
                 zero_infinity: bool = True, kind: str = "kl_uniform"):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        _check_reduction(reduction)
        if kind not in SMOOTHING_KINDS:
            raise ValueError(f"smoothing kind must be one of {SMOOTHING_KINDS}, got {kind!r}")
        self.blank, self.smoothing, self.reduction = blank, float(smoothing), reduction
        self.zero_infinity, self.kind = zero_infinity, kind

    def forward(self, log_probs: torch.Tensor, out_lens: torch.Tensor, targets: torch.Tensor,
                target_lens: torch.Tensor, weights: torch.Tensor | None = None) -> CTCLossOutput:
        lp = log_probs.float()
        out_lens = out_lens.to(lp.device)
        target_lens = target_lens.to(lp.device)
        w = _weights(weights, lp.size(0), lp.device)

        ctc = _ctc_per_utterance(lp, out_lens, targets, target_lens, self.blank, self.zero_infinity)

        real = frame_mask(out_lens, lp.size(1))
        # zero padded frames *before* the per-frame term: garbage there (even -inf) must not reach the
        # value or, through 0·inf, the gradient
        term = smoothing_per_frame(torch.where(real[:, :, None], lp, torch.zeros_like(lp)), self.kind)
        smooth_sum = term.masked_fill(~real, 0.0).sum(1)

        if self.reduction == "mean":
            ctc = ctc / target_lens.clamp_min(1).to(ctc.dtype)
            smooth = smooth_sum / out_lens.clamp_min(1).to(smooth_sum.dtype)
        else:
            smooth = smooth_sum
        ctc_red = _weighted_reduce(ctc, w, self.reduction)
        smooth_red = _weighted_reduce(smooth, w, self.reduction)
        loss = (1.0 - self.smoothing) * ctc_red + self.smoothing * smooth_red
        return CTCLossOutput(loss=loss, ctc=ctc_red, smooth=smooth_red)


class ConstantMixCTCLoss(nn.Module):
    r"""The reference post's "label smoothing", kept only to compare against. Do not train with it.

    It feeds ``log_probs·(1-s) + s/V`` to CTC. That is not a smoothed distribution:

    * ``exp`` of it is ``p^(1-s)·e^(s/V)``, which does not sum to 1 over the vocabulary, so it is not a
      log-distribution at all; mixing with uniform would be ``log((1-s)·p + s/V)``, and even that would
      only change what CTC is computed on, not add a pull toward uniform.
    * The ``+ s/V`` shifts every path's score by ``T·s/V``: the reported loss drops by a constant
      ``T·s/V`` per utterance that has no gradient and makes the numbers incomparable with plain CTC.
    * The ``·(1-s)`` is a temperature: CTC's alignment posterior is computed from ``p^(1-s)``, i.e.
      from a flattened distribution, which rewards a *peakier* ``p`` — the opposite of smoothing.
    * torch's CTC backward assumes normalized log-probs (its gradient formula uses ``exp(input)`` as
      the softmax output), so for this unnormalized input the gradient it returns is not even the
      gradient of the value it returns.
    """

    def __init__(self, smoothing: float = 0.1, blank: int = 0, reduction: str = "mean", zero_infinity: bool = True):
        super().__init__()
        _check_reduction(reduction)
        self.blank, self.smoothing, self.reduction, self.zero_infinity = blank, float(smoothing), reduction, zero_infinity

    def forward(self, log_probs: torch.Tensor, out_lens: torch.Tensor, targets: torch.Tensor,
                target_lens: torch.Tensor, weights: torch.Tensor | None = None) -> CTCLossOutput:
        lp = log_probs.float()
        mixed = lp * (1.0 - self.smoothing) + self.smoothing / lp.size(-1)  # verbatim from the post
        target_lens = target_lens.to(lp.device)
        ctc = _ctc_per_utterance(mixed, out_lens.to(lp.device), targets, target_lens, self.blank, self.zero_infinity)
        if self.reduction == "mean":
            ctc = ctc / target_lens.clamp_min(1).to(ctc.dtype)
        loss = _weighted_reduce(ctc, _weights(weights, lp.size(0), lp.device), self.reduction)
        return CTCLossOutput(loss=loss, ctc=loss, smooth=torch.zeros_like(loss))


CTC_LOSS_KINDS = ("plain", "smoothed", "constant_mix")


def build_ctc_loss(kind: str = "smoothed", smoothing: float = 0.1, blank: int = 0, reduction: str = "mean",
                   zero_infinity: bool = True, smoothing_kind: str = "kl_uniform") -> nn.Module:
    """"plain" | "smoothed" | "constant_mix" -> a loss module returning ``CTCLossOutput``.

    "plain" is ``SmoothedCTCLoss`` with ``s=0``: identical to torch's CTC, but the smoothing term is
    still computed (and returned in ``.smooth``) so runs with and without smoothing log the same metric.
    """
    if kind == "plain":
        return SmoothedCTCLoss(blank, 0.0, reduction, zero_infinity, smoothing_kind)
    if kind == "smoothed":
        return SmoothedCTCLoss(blank, smoothing, reduction, zero_infinity, smoothing_kind)
    if kind == "constant_mix":
        return ConstantMixCTCLoss(smoothing, blank, reduction, zero_infinity)
    raise ValueError(f"CTC loss kind must be one of {CTC_LOSS_KINDS}, got {kind!r}")
