"""Voice-adversarial training: an encoder whose output does not tell the training voices apart.

A model fine-tuned on a few voices can lean on what identifies each of them (a vocoder's buzz, one speaker's
formants) and then fails on a voice it never heard. Domain-adversarial training (Ganin & Lempitsky 2015) and
speaker-invariant training for ASR (Meng et al. 2018, "Speaker-Invariant Training via Adversarial Learning")
add a classifier that guesses the voice from the encoder's output, trained as usual, while the gradient it
sends back into the encoder is reversed: the encoder is pushed to make the voice unguessable, the CTC loss
keeps what the words need.

* The classifier reads the encoder's output (``model.encoder``'s ``(hidden (B, T, D), lens)``), mean-pooled
  over each utterance's real frames, through a gradient-reversal layer, then Linear -> ReLU -> Linear.
* ``label``: ``voice`` (the manifest's ``engine:voice``, the synthetic corpus's voice families) or
  ``speaker`` (the manifest's speaker, what a real corpus has). The classes are the training utterances'
  labels, sorted, so every rank numbers them alike.
* Loss: ``weight`` x cross-entropy, added to the CTC loss; the reversed gradient is scaled by a ramp from 0
  to 1 over ``ramp_steps`` (a random classifier's gradient would only be noise in the encoder).
* Training only: the classifier is a submodule (``voice_adversary``) so the optimizer, the gradient
  allreduce and checkpoints carry it, but ``model.pt`` leaves it out, and dev scoring never calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LABELS = ("voice", "speaker")
MODULE_NAME = "voice_adversary"  # the submodule's name; its weights are left out of model.pt


@dataclass(frozen=True)
class AdversarySettings:
    enabled: bool = False
    weight: float = 0.1
    label: str = "voice"
    hidden: int = 256
    ramp_steps: int = 200

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"voice_adversary.label must be one of {LABELS}, got {self.label!r}")
        if not self.weight > 0 or self.hidden < 1 or self.ramp_steps < 0:
            raise ValueError(f"voice_adversary needs weight > 0, hidden >= 1 and ramp_steps >= 0, got {self}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AdversarySettings":
        return cls(**(d or {}))


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient multiplied by ``-scale`` backward."""
    return _ReverseGradient.apply(x, float(scale))


def reversal_scale(step: int, ramp_steps: int) -> float:
    """The reversed gradient's scale at ``step``: a linear ramp from 0 to 1 over ``ramp_steps`` (0: 1 at once)."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def mean_pool(hidden: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B,) -> (B, D): the mean over each row's first ``lens`` frames (padding never counts)."""
    mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lens[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


class VoiceAdversary(nn.Module):
    """Guesses each utterance's voice from the encoder's output, through a gradient-reversal layer."""

    def __init__(self, d_model: int, classes: Sequence[str], hidden: int = 256):
        super().__init__()
        self.classes = list(classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, len(self.classes)))
        self.captured: tuple[torch.Tensor, torch.Tensor] | None = None  # the encoder's last output (the hook's)

    def capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Forward hook on ``model.encoder``: keep its (hidden, lens) for the loss."""
        self.captured = (output[0], output[1]) if isinstance(output, tuple) else None

    def targets(self, labels: Sequence[str], device: torch.device) -> torch.Tensor:
        unknown = sorted(set(labels) - set(self.class_index))
        if unknown:
            raise ValueError(f"voice_adversary: label(s) {unknown[:3]} are not among the training voices {self.classes}")
        return torch.tensor([self.class_index[x] for x in labels], dtype=torch.long, device=device)

    def forward(self, hidden: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        pooled = mean_pool(hidden.float(), lens.to(hidden.device))
        return self.net(reverse_gradient(pooled, scale))

    def loss(self, labels: Sequence[str], scale: float) -> torch.Tensor:
        """Cross-entropy of the voices of the batch whose encoder output the hook captured last; read once."""
        if self.captured is None:
            raise ValueError("voice_adversary: the encoder's output was not captured (the model's `encoder` must "
                             "return (hidden, lens); a run on cached encoder outputs has no encoder pass)")
        hidden, lens = self.captured
        self.captured = None
        logits = self(hidden, lens, scale)
        return F.cross_entropy(logits, self.targets(labels, logits.device))


def utterance_label(voice: str, speaker: str, label: str) -> str:
    """The adversary's label of one utterance from its metadata (``voice`` is "" where the manifest has none)."""
    if label == "speaker":
        return speaker
    if not voice:
        raise ValueError("voice_adversary.label is 'voice' but the manifest has no engine/voice fields "
                         "(a real corpus: use label: speaker)")
    return voice


def attach_voice_adversary(model: nn.Module, settings: AdversarySettings, classes: Sequence[str]) -> VoiceAdversary:
    """Add the classifier to ``model`` as ``voice_adversary`` and hook it on ``model.encoder``'s output."""
    encoder = getattr(model, "encoder", None)
    d_model = getattr(encoder, "d_model", None) or getattr(encoder, "output_dim", None)
    if encoder is None or not d_model:
        raise ValueError(f"voice_adversary needs a model with an `encoder` that states its width; "
                         f"{type(model).__name__} has none")
    if len(classes) < 2:
        raise ValueError(f"voice_adversary needs at least 2 {settings.label}s in training, got {list(classes)}")
    adversary = VoiceAdversary(int(d_model), classes, settings.hidden)
    model.add_module(MODULE_NAME, adversary)
    encoder.register_forward_hook(adversary.capture)
    return adversary
