"""The start noise of a run: drawn as ComfyUI draws it, and scaled onto the latent at σ_0.

The samplers' own noise (ancestral steps, SDE increments) is drawn inside `solvers.py` from
the generator they are given.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ldm_core.sampling.schedule import DiscreteSchedule


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
