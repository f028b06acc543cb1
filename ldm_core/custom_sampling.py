"""ComfyUI's SamplerCustom job: a given sampler over given sigmas, raw latent in, raw latent out.

The KSampler path (`pipeline.ksample`) plans its own sigmas from a scheduler name; this one takes
both the sampler and the σ schedule from the graph (KSamplerSelect, BasicScheduler, SplitSigmas, …)
and also returns the last denoised estimate x̂0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .conditioning import Cond
from .model import DiffusionModel
from .pipeline import sample
from .progress import Progress, null_progress
from .samplers import SamplerChoice


def sample_custom(
    model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], latent: torch.Tensor, *,
    sampler: SamplerChoice, sigmas: torch.Tensor, cfg: float, seed: int, add_noise: bool = True,
    batch_index: Sequence[int] | None = None, noise_mask: torch.Tensor | None = None,
    progress: Progress = null_progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, denoised_output) raw latents [B, C, h, w], as ComfyUI's SamplerCustom: the given
    sampler over the given σ (see `pipeline.sample` for noise, masks and seeding). Fewer than two
    σ: the latent comes back unchanged."""
    return sample(model, positive, negative, latent, sampler=sampler, sampler_name=sampler.name, sigmas=sigmas,
                  cfg=cfg, seed=seed, add_noise=add_noise, batch_index=batch_index, noise_mask=noise_mask,
                  progress=progress)
