"""Exponential moving average of weights: θ_ema ← θ_ema + (1 − d)·(θ − θ_ema)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, decay: float) -> float:
    """The decay used after `step` updates: min(decay, (1 + step) / (10 + step)), so early
    averages are not dominated by the random initialisation (warm-up as in Keras/TF EMA)."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """A frozen copy of a module whose floating tensors track the module's by EMA."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = ema_decay(step, self.decay)
        own = self.module.state_dict()
        for name, value in module.state_dict().items():
            target = own[name]
            if target.is_floating_point():
                target.lerp_(value, 1.0 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd, strict=True)
