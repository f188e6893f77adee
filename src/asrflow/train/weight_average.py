"""The running mean of a run's own weights: ``training.weight_average: {enabled, start_step, every}``.

Stochastic weight averaging (Izmailov et al. 2018) and icefall's ``model_avg`` (``--average-period``): the
weights after every ``every``-th step from ``start_step`` on are averaged, uniformly, as training goes; the
exported ``model.pt`` holds that mean instead of the best-by-dev-loss checkpoint. A mean of weights along
one run lies in a flatter region of the loss than any single point of it, which is what generalizes to
conditions training never saw (Cha et al. 2021, SWAD: domain generalization by seeking flat minima), the
reason it is here: the voices training never hears.

Every floating-point entry of the state dict is averaged (parameters and BatchNorm running statistics
alike, as icefall does); integer entries (``num_batches_tracked``) take the newest value. The mean is kept
in float32 whatever the training precision, and travels in every checkpoint, so a resumed run averages
exactly what an uninterrupted one would have. Every rank holds the same weights after each step, so every
rank's mean is the same; rank 0 writes it.
"""
from __future__ import annotations

from typing import Any

import torch


class WeightAverage:
    """Uniform mean of the model's state dict after steps ``start_step, start_step + every, ...``."""

    def __init__(self, start_step: int, every: int):
        if start_step < 1 or every < 1:
            raise ValueError(f"weight_average: start_step ({start_step}) and every ({every}) must be at least 1")
        self.start_step, self.every = int(start_step), int(every)
        self.count = 0
        self.weights: dict[str, torch.Tensor] = {}

    @classmethod
    def from_params(cls, cfg: dict[str, Any] | None) -> "WeightAverage | None":
        cfg = cfg or {}
        if not cfg.get("enabled"):
            return None
        return cls(int(cfg.get("start_step", 1)), int(cfg.get("every", 1)))

    def due(self, step: int) -> bool:
        """Whether the weights after ``step`` optimizer steps (1-based) join the mean."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> bool:
        if not self.due(step):
            return False
        self.count += 1
        for name, value in model.state_dict().items():
            if not torch.is_floating_point(value):
                self.weights[name] = value.detach().clone()
            elif self.count == 1 or name not in self.weights:
                self.weights[name] = value.detach().float().clone()
            else:  # the incremental mean: exact for a uniform average, with no sum growing in float32
                self.weights[name].add_(value.detach().float() - self.weights[name], alpha=1.0 / self.count)
        return True

    def averaged_state_dict(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean in the dtypes of ``like`` (the model's own state dict)."""
        if self.count == 0:
            raise RuntimeError(f"weight_average: no step reached start_step {self.start_step}: nothing averaged")
        missing = sorted(set(like) - set(self.weights))
        if missing:
            raise RuntimeError(f"weight_average: the mean lacks {missing[:4]}; the model changed during training")
        return {k: self.weights[k].to(like[k].dtype) for k in like}

    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "every": self.every, "count": self.count, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["start_step"], state["every"]) != (self.start_step, self.every):
            raise ValueError(f"weight_average: the checkpoint averaged from step {state['start_step']} every "
                             f"{state['every']}, this run from {self.start_step} every {self.every}")
        self.count = int(state["count"])
        self.weights = {k: v.clone() for k, v in state["weights"].items()}
