"""The denoising loop in σ-space: denoiser wrapper, sampler table, initial noise (guidance: guidance.py).

Samplers see one function D(x, σ) → x̂0 and nothing else (Karras et al. 2022): the
prediction type (ε or v), the input scaling c_in and the σ → t mapping stay inside
`Denoiser`. Every sampler is a small function in `samplers.py` registered in `SAMPLERS`;
that dict also feeds the editor's dropdown, so the two can never drift apart.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ldm_core.sampling.solvers import (  # re-exported (__all__): the sampler table and its contract live here too
    DISCARD_PENULTIMATE, SAMPLERS, BrownianNoise, DenoiseFn, Sampler, StepCallback, ancestral_step,
    gaussian_noise, sample_euler, to_d,
)
from ldm_core.sampling.schedule import DiscreteSchedule

__all__ = ["DISCARD_PENULTIMATE", "SAMPLERS", "BrownianNoise", "DenoiseFn", "Denoiser", "Sampler", "StepCallback",
           "ancestral_step", "gaussian_noise", "noise_latent", "prepare_noise", "sample_euler", "to_d"]


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


def prepare_noise(shape: Sequence[int], seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Initial noise exactly as ComfyUI draws it: CPU float32 `torch.randn` from a generator
    seeded with `seed`, one [B,C,h,w] draw, or, with `batch_index`, one [1,C,h,w] draw per
    index up to the largest (so image k of a batch equals image k generated alone)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(list(shape), generator=generator, dtype=torch.float32)
    unique, inverse = np.unique(np.asarray(batch_index), return_inverse=True)
    one = [1, *shape[1:]]
    draws = [torch.randn(one, generator=generator, dtype=torch.float32) for _ in range(int(unique[-1]) + 1)]
    return torch.cat([draws[int(unique[i])] for i in inverse.reshape(-1)])


def noise_latent(schedule: DiscreteSchedule, sigmas: torch.Tensor, noise: torch.Tensor,
                 latent: torch.Tensor) -> torch.Tensor:
    """x at σ_0: latent + σ_0·noise, or sqrt(1 + σ_0²)·noise when starting from σ_max (pure
    noise), matching the variance of the trained forward process at t = T."""
    sigma0 = float(sigmas[0])
    sigma_max = float(schedule.sigma_max)
    scale = math.sqrt(1.0 + sigma0**2) if (math.isclose(sigma_max, sigma0, rel_tol=1e-5) or sigma0 > sigma_max) else sigma0
    return noise * scale + latent
