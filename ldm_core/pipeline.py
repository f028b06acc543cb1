"""Whole jobs built from the parts: KSampler-style sampling and text-to-image."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .conditioning import Cond
from .latent import empty
from .model import Checkpoint, DiffusionModel
from .progress import Progress, null_progress
from .guidance import CFGGuider
from .sampling import SAMPLERS, noise_latent, prepare_noise
from .schedule import get_sigmas


def step_window(sigmas: torch.Tensor, start_step: int | None, last_step: int | None,
                force_full_denoise: bool) -> torch.Tensor | None:
    """KSamplerAdvanced's step window: keep steps [start_step, last_step]; ending early keeps the
    leftover noise unless `force_full_denoise` sets the last σ to 0. None: nothing to run."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


@torch.inference_mode()
def ksample(
    model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], latent: torch.Tensor, *,
    seed: int, steps: int, cfg: float, sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
    batch_index: Sequence[int] | None = None, add_noise: bool = True, start_step: int | None = None,
    last_step: int | None = None, force_full_denoise: bool = False, progress: Progress = null_progress,
) -> torch.Tensor:
    """ComfyUI KSampler / KSamplerAdvanced semantics: raw latent in, raw latent out.

    Noise is drawn on the CPU from `seed` (see `prepare_noise`), so a seed gives the same
    image on every device; `add_noise=False` starts from the latent as it is (a second pass
    over leftover noise). The latent is scaled into the model's space, noised to σ_0,
    denoised along the schedule, and scaled back.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
    sigmas = get_sigmas(model.schedule, scheduler, steps, denoise)
    window = step_window(sigmas, start_step, last_step, force_full_denoise)
    if len(sigmas) == 0 or window is None:
        return latent
    sigmas = window
    noise = prepare_noise(latent.shape, seed, batch_index) if add_noise else torch.zeros(latent.shape)
    x_latent = model.latent_in(latent.float())
    x = noise_latent(model.schedule, sigmas, noise, x_latent).to(model.device)
    guider = CFGGuider(model.denoiser(), model.config, positive, negative, cfg, image_size=(
        latent.shape[-2] * 8, latent.shape[-1] * 8))
    total = len(sigmas) - 1
    progress.start(total)

    def callback(info: dict) -> None:
        progress.update(info["i"] + 1, total, preview=info["denoised"])

    out = SAMPLERS[sampler](guider, x, sigmas.to(model.device), callback=callback)
    progress.finish()
    return model.latent_out(out.float().cpu())


def txt2img(
    ckpt: Checkpoint, prompt: str, negative: str = "", *, width: int = 512, height: int = 512, steps: int = 20,
    cfg: float = 7.0, seed: int = 0, batch_size: int = 1, sampler: str = "euler", scheduler: str = "normal",
    clip_skip: int | None = None, progress: Progress = null_progress,
) -> torch.Tensor:
    """Prompt → IMAGE [B, H, W, 3] in 0..1: encode, sample from seeded noise, decode once."""
    if ckpt.text_encoder is None or ckpt.vae is None:
        raise ValueError("txt2img needs a checkpoint that contains a text encoder and a VAE")
    text = ckpt.text_encoder if clip_skip is None else ckpt.text_encoder.with_clip_skip(clip_skip)
    positive, negative_cond = text.encode(prompt), text.encode(negative)
    latent = empty(width, height, batch_size, ckpt.model.latent_channels, ckpt.vae.factor)
    samples = ksample(ckpt.model, [positive], [negative_cond], latent, seed=seed, steps=steps, cfg=cfg,
                      sampler=sampler, scheduler=scheduler, progress=progress)
    return ckpt.vae.decode(samples)
