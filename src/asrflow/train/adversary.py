"""Voice-adversarial training: an encoder whose output does not tell the training voices apart.

A model fine-tuned on a few voices can lean on what identifies each of them (a vocoder's buzz, one speaker's
formants) and then fails on a voice it never heard. Adversarial training against a voice classifier
(speaker-invariant training for ASR, Meng et al. 2018) adds a classifier that guesses the voice from the encoder's
output, and asks the encoder to make that guess impossible while CTC keeps what the words need.

* The classifier reads the encoder's output (``model.encoder``'s ``(hidden (B, T, D), lens)``), mean-pooled over
  each utterance's real frames, through Linear -> ReLU -> Linear, and learns the true voices (cross-entropy,
  its own weights only: the encoder gets no gradient from this term).
* The encoder's term is the classifier's *confusion* (Tzeng et al. 2015; Alvi et al. 2018): the cross-entropy of
  its prediction against the uniform distribution, through the classifier's weights held fixed, lowest (ln of the
  number of voices) when the prediction says nothing. Not gradient reversal (Ganin & Lempitsky 2015): maximizing
  the classifier's cross-entropy is unbounded, and on Whisper's encoder it was reached by making the classifier
  confidently wrong (its cross-entropy 21 against chance's 2.8 fifty steps after the unfreeze, the CTC part of
  the loss 1.5x the plain run's; docs/results.md, "Session 24"), which still tells the voices apart.
* ``label``: ``voice`` (the manifest's ``engine:voice``, the synthetic corpus's voice families) or ``speaker``
  (the manifest's speaker, what a real corpus has). The classes are the training utterances' labels, sorted, so
  every rank numbers them alike.
* Loss: ``weight`` x (classifier cross-entropy + ramp x confusion), the encoder's term ramped from 0 to 1 over
  ``ramp_steps`` (the classifier must first learn something worth confusing).
* Training only: the classifier is a submodule (``voice_adversary``) so the optimizer, the gradient allreduce and
  checkpoints carry it, but ``model.pt`` leaves it out, and dev scoring never calls it.
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


def confusion_scale(step: int, ramp_steps: int) -> float:
    """The encoder's confusion term's scale at ``step``: a linear ramp from 0 to 1 over ``ramp_steps`` (0: 1 at once)."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def mean_pool(hidden: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B,) -> (B, D): the mean over each row's first ``lens`` frames (padding never counts)."""
    mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lens[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


class VoiceAdversary(nn.Module):
    """Guesses each utterance's voice from the encoder's output; ``loss`` trains it and confuses the encoder."""

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

    def forward(self, pooled: torch.Tensor, fixed: bool = False) -> torch.Tensor:
        """Logits; ``fixed``: through detached copies of the weights, so only the input gets a gradient."""
        if not fixed:
            return self.net(pooled)
        first, last = self.net[0], self.net[2]
        h = F.relu(F.linear(pooled, first.weight.detach(), first.bias.detach()))
        return F.linear(h, last.weight.detach(), last.bias.detach())

    def loss(self, labels: Sequence[str], confusion_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the classifier's cross-entropy on the true voices, which trains it alone; its cross-entropy against
        the uniform distribution x ``confusion_weight``, which trains the encoder alone) for the batch whose
        encoder output the hook captured last; read once."""
        if self.captured is None:
            raise ValueError("voice_adversary: the encoder's output was not captured (the model's `encoder` must "
                             "return (hidden, lens); a run on cached encoder outputs has no encoder pass)")
        hidden, lens = self.captured
        self.captured = None
        pooled = mean_pool(hidden.float(), lens.to(hidden.device))
        classify = F.cross_entropy(self(pooled.detach()), self.targets(labels, pooled.device))
        confusion = -self(pooled, fixed=True).log_softmax(-1).mean(-1).mean()
        return classify, confusion_weight * confusion


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
