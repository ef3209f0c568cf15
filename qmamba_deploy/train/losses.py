"""Losses, learning-rate schedules and the EMA of the weights (pure functions of the iteration)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OptionError


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + eps^2)), as in BasicSR's CharbonnierLoss."""
    return torch.sqrt((pred - target).pow(2) + eps * eps).mean()

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,
    "charbonnier": charbonnier_loss,
    "mse": F.mse_loss,
}

DEFAULT_LOSS = {"sr": "l1", "denoise": "charbonnier", "jpeg": "charbonnier"}

SCHEDULES = ("multistep", "cosine", "constant")

@dataclass(frozen=True)
class Schedule:
    """Learning-rate factor as a pure function of the iteration (so resuming needs no state).

    ``milestones`` are fractions of ``total`` for ``multistep`` (BasicSR's
    MultiStepLR at 50/80/90/95 % by default); ``cosine`` decays to
    ``eta_min`` x the base rate; ``warmup`` iterations ramp up linearly first.
    """

    kind: str = "multistep"
    total: int = 1000
    milestones: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    gamma: float = 0.5
    warmup: int = 0
    eta_min: float = 0.01

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise OptionError(f"--schedule {self.kind!r} is unknown; use {', '.join(SCHEDULES)}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise OptionError(f"--milestones {list(self.milestones)} must be fractions of the run in (0, 1)")

    def factor(self, it: int) -> float:
        """Factor for the step that makes iteration ``it`` (0-based) -> ``it + 1``."""
        if self.warmup and it < self.warmup:
            return (it + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "multistep":
            return self.gamma ** sum(it >= round(m * self.total) for m in self.milestones)
        span = max(self.total - self.warmup, 1)
        t = min(max(it - self.warmup, 0) / span, 1.0)
        return self.eta_min + (1 - self.eta_min) * 0.5 * (1 + math.cos(math.pi * t))

class EMA:
    """Exponential moving average of a model's parameters and buffers (BasicSR's model_ema)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(src[k].detach(), alpha=1 - self.decay)
            else:
                v.copy_(src[k])
