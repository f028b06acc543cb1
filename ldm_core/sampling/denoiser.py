"""D(x, σ): the UNet as the denoiser the samplers see (guidance: guidance.py).

Samplers see one function D(x, σ) → x̂0 and nothing else (Karras et al. 2022): the
prediction type (ε or v), the input scaling c_in and the σ → t mapping stay inside
`Denoiser`. The samplers are small functions in `solvers.py`, listed with their traits in
`sampler_table.SAMPLERS`; the start noise is drawn in `noise.py`.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm_core.sampling.schedule import DiscreteSchedule


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] followed by two channels, x then y, each running −1 → 1 across the
    width / height (the coordinate input of a `coord_channels` model)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


class Denoiser:
    """D(x, σ) for an ε- or v-predicting UNet trained on a discrete schedule.

    With x = x0 + σ·ε the network sees c_in·x, c_in = 1/sqrt(σ² + 1) (unit variance), at
    the nearest trained step t(σ). ε-prediction: x̂0 = x − σ·ε̂. v-prediction (Salimans &
    Ho 2022): x̂0 = x/(σ² + 1) − σ·v̂/sqrt(σ² + 1).
    """

    def __init__(self, unet: nn.Module, schedule: DiscreteSchedule, prediction: str, dtype: torch.dtype,
                 coord_channels: bool = False) -> None:
        self.unet, self.schedule, self.prediction, self.dtype = unet, schedule, prediction, dtype
        self.coord_channels = coord_channels

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None = None, concat: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
        inp = x.float() / (s**2 + 1).sqrt()
        if concat is not None:
            inp = torch.cat([inp, concat.to(inp)], dim=1)
        if self.coord_channels:
            inp = with_coordinates(inp)
        t = self.schedule.timestep(sigma.float().cpu()).to(x.device)
        out = self.unet(inp.to(self.dtype), t, context.to(x.device, self.dtype),
                        None if y is None else y.to(x.device, self.dtype)).float()
        if self.prediction == "v":
            return x.float() / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        return x.float() - out * s
