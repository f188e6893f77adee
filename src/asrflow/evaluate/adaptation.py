"""Test-time adaptation to the one recording being transcribed (SUTA: Lin et al. 2022, "Listen, Adapt, Better
WER: Source-free Single-utterance Test-time Adaptation for Automatic Speech Recognition").

A model fine-tuned on a few voices meets a voice it never heard; its posteriors there are less confident.
Before decoding an utterance, a few gradient steps on that utterance alone make them confident again:
minimize the entropy of the model's (temperature-smoothed) posteriors over the frames it does not call
blank, updating only the LayerNorm gains and biases (a few thousand numbers; the rest of the model is
untouched). No label and no other utterance is used, and every utterance starts again from the trained
weights (episodic), so the result does not depend on the order or the company of the utterances, and a
bad step can only ever hurt the one utterance it was taken on.

* ``steps`` 0 is plain decoding; ``lr`` the Adam learning rate of the LayerNorm parameters;
  ``temperature`` smooths the posteriors whose entropy is minimized (SUTA's 2.5).
* Deterministic: no dropout (eval mode), no sampling, one utterance at a time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

ADAPTED_MODULES = (nn.LayerNorm,)
ADAPTED_PARAMETERS = ("norms", "all")


@dataclass(frozen=True)
class AdaptSettings:
    # the defaults are what dev chose for the long Whisper models (docs/results.md, "Session 20"), steps aside
    steps: int = 0
    lr: float = 1e-5
    temperature: float = 2.5
    parameters: str = "all"  # "all": every weight of the acoustic model; "norms": the LayerNorms only

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"test-time adaptation needs steps >= 0, lr > 0 and temperature > 0, got {self}")
        if self.parameters not in ADAPTED_PARAMETERS:
            raise ValueError(f"test-time adaptation parameters must be one of {ADAPTED_PARAMETERS}, got {self.parameters!r}")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "temperature": self.temperature, "parameters": self.parameters}

    @classmethod
    def from_dict(cls, d: dict | None) -> "AdaptSettings":
        return cls(**d) if d else cls(0)


def settings_grid(cfg: dict | None) -> tuple[AdaptSettings, ...]:
    """``evaluation.test_time_adaptation`` ({steps: [...], lr: [...], parameters, temperature}) -> the settings
    dev chooses from: no adaptation first (so a tie keeps plain decoding), then every steps x lr."""
    cfg = cfg or {}
    steps, lrs = cfg.get("steps", [0]), cfg.get("lr", [1e-5])
    extra = {k: cfg[k] for k in ("parameters", "temperature") if k in cfg}
    grid = [AdaptSettings(0)] + [AdaptSettings(int(n), float(lr), **extra) for n in steps if int(n) > 0 for lr in lrs]
    return tuple(grid)


def adapted_parameters(model: nn.Module, which: str = "norms") -> list[nn.Parameter]:
    """The LayerNorm gains and biases of ``model`` (``which="norms"``), or all its weights: what test-time
    adaptation changes."""
    if which == "all":
        return list(model.parameters())
    params = [p for m in model.modules() if isinstance(m, ADAPTED_MODULES) for p in m.parameters()]
    if not params:
        raise ValueError(f"{type(model).__name__} has no LayerNorm to adapt at test time")
    return params


def entropy_of_speech_frames(log_probs: torch.Tensor, blank: int, temperature: float) -> torch.Tensor:
    """Mean entropy of the temperature-smoothed posteriors (T, V) over the frames whose best class is not
    blank (all frames when every one is blank)."""
    speech = log_probs.argmax(-1) != blank
    frames = log_probs[speech] if bool(speech.any()) else log_probs
    p = torch.softmax(frames / temperature, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def adapted_log_probs(model, wave: torch.Tensor, settings: AdaptSettings) -> torch.Tensor:
    """(T, V) log-probs of one utterance after ``settings.steps`` entropy-minimization steps on it alone.
    ``model`` is a :class:`asrflow.transcribe.Recognizer`; it is left exactly as it was."""
    lens = torch.tensor([len(wave)])
    batch = wave[None].float()
    if not settings.enabled:
        with torch.no_grad():
            lp, out = model(batch, lens)
        return lp[0, : int(out[0])].float()
    work = copy.deepcopy(model).eval()  # episodic: every utterance starts from the trained weights
    for p in work.parameters():
        p.requires_grad_(False)
    params = adapted_parameters(work.acoustic, settings.parameters)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=settings.lr)
    blank = work.vocab.blank_id
    for _ in range(settings.steps):
        lp, out = work(batch, lens)
        loss = entropy_of_speech_frames(lp[0, : int(out[0])].float(), blank, settings.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        lp, out = work(batch, lens)
    return lp[0, : int(out[0])].float()


def adapted_emissions(model, waves: dict[str, torch.Tensor], settings: AdaptSettings,
                      ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-utterance (T, V) log-probs, each adapted to its own utterance (see the module doc)."""
    return {uid: adapted_log_probs(model, waves[uid], settings) for uid in (ids or sorted(waves))}
