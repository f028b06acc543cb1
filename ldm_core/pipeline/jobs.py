"""Whole jobs built from the parts: KSampler-style sampling and text-to-image."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldm_core.conditioning import inpaint
from ldm_core.conditioning.cond import Cond
from ldm_core.imaging.latent import empty
from ldm_core.imaging.mask import to_latent
from ldm_core.loading.model import Checkpoint, DiffusionModel
from ldm_core.progress import Progress, null_progress
from ldm_core.sampling.guidance import CFGGuider
from ldm_core.sampling.noise import noise_latent, prepare_noise
from ldm_core.sampling.sampler_table import SamplerChoice, select_sampler
from ldm_core.sampling.schedule import get_sigmas
from ldm_core.sampling.solvers import DenoiseFn
from ldm_core.tiling.tiled_diffusion import TiledDenoiser, plan_windows


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


def make_guider(model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float,
                latent_shape: Sequence[int]) -> CFGGuider:
    """The guided D(x, σ) for a latent of `latent_shape` [B, C, h, w] (size conditioning from h, w)."""
    return CFGGuider(model.denoiser(), model.config, positive, negative, cfg, image_size=model.image_size(latent_shape))


@dataclass(frozen=True)
class Tiling:
    """Tiled diffusion (tiling/tiled_diffusion.py): windows of `tile` latent cells sharing `overlap`."""

    tile: int
    overlap: int
    blend: str = "feather"


def guided_denoiser(model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float,
                    latent_shape: Sequence[int], tiling: Tiling | None = None) -> DenoiseFn:
    """The guider, or with `tiling` the MultiDiffusion blend of the guider over windows (areas,
    masks and inpaint inputs stay placed on the full latent)."""
    guider = make_guider(model, positive, negative, cfg, latent_shape)
    if tiling is None:
        return guider
    h, w = latent_shape[-2:]
    windows = plan_windows(h, w, tiling.tile, tiling.overlap)
    return TiledDenoiser(lambda win: guider.window((h, w), win.top, win.left), windows, h, w, tiling.overlap,
                         tiling.blend)


@torch.inference_mode()
def sample(
    model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], latent: torch.Tensor, *,
    sampler: SamplerChoice, sigmas: torch.Tensor, cfg: float, seed: int, add_noise: bool = True,
    batch_index: Sequence[int] | None = None, noise_mask: torch.Tensor | None = None,
    tiling: Tiling | None = None, progress: Progress = null_progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `sampler` along `sigmas`: raw latent in, (output, last x̂0) raw latents out.

    The one sampling core under KSampler, KSamplerAdvanced, SamplerCustom and tiled sampling.
    x starts at latent + σ_0·noise (sqrt(1 + σ_0²)·noise from σ_max), the noise drawn on the
    CPU from `seed` (zeros without `add_noise`); the sampler's own noise (ancestral, SDE) comes
    from the same `seed`, drawn on the CPU as ComfyUI does — so a seed gives the
    same image on every device. `noise_mask` (a LATENT's "noise_mask", 1 = repaint) is resized
    onto the latent and the region outside it is re-imposed at every model call
    (inpaint.KnownRegion); inpaint models (9-channel UNets) get their mask + masked-image input
    from the conditioning, else from the noise mask and latent. Each step reports progress
    with a lazily computed preview of x̂0 (`model.preview`).
    """
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas: expected a 1-D schedule, got shape {tuple(sigmas.shape)}")
    if len(sigmas) < 2:
        return latent, latent
    noise = prepare_noise(latent.shape, seed, batch_index) if add_noise else torch.zeros(latent.shape)
    x_latent = model.latent_in(latent.float())
    x = noise_latent(model.schedule, sigmas, noise, x_latent).to(model.device)
    mask = None if noise_mask is None else to_latent(noise_mask, latent.shape)
    positive, negative = (inpaint.with_concat(model.config, conds, latent.shape, x_latent, mask)
                          for conds in (positive, negative))
    denoiser = guided_denoiser(model, positive, negative, cfg, latent.shape, tiling)
    if mask is not None:
        known_noise = inpaint.inpaint_noise(sampler.entry.inpaint_noise, latent.shape, seed, noise)
        denoiser = inpaint.KnownRegion(denoiser, x_latent.to(model.device), known_noise.to(model.device),
                                       mask.to(model.device))
    total = len(sigmas) - 1
    last: dict[str, torch.Tensor] = {}
    progress.start(total)

    def callback(info: dict) -> None:
        denoised = last["denoised"] = info["denoised"]
        preview = None if model.preview is None else (lambda: model.preview(denoised))
        progress.update(info["i"] + 1, total, preview=preview)

    out = sampler(denoiser, x, sigmas.float().to(model.device), callback=callback, seed=seed)
    progress.finish()
    out = model.latent_out(out.float().cpu())
    denoised = model.latent_out(last["denoised"].float().cpu()) if "denoised" in last else out
    return out, denoised


def ksample(
    model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], latent: torch.Tensor, *,
    seed: int, steps: int, cfg: float, sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
    batch_index: Sequence[int] | None = None, add_noise: bool = True, start_step: int | None = None,
    last_step: int | None = None, force_full_denoise: bool = False, noise_mask: torch.Tensor | None = None,
    tiling: Tiling | None = None, progress: Progress = null_progress,
) -> torch.Tensor:
    """ComfyUI KSampler / KSamplerAdvanced semantics: raw latent in, raw latent out.

    Plans σ from `scheduler`, `steps` and `denoise` (img2img is `denoise` < 1: only the last
    steps of a longer schedule run, from the input noised to that σ_0), cuts KSamplerAdvanced's
    step window, then runs `sample` (noise, inpainting, tiling: see there).
    """
    choice = select_sampler(sampler)
    sigmas = get_sigmas(model.schedule, scheduler, steps, denoise,
                        discard_penultimate=choice.entry.discard_penultimate)
    window = step_window(sigmas, start_step, last_step, force_full_denoise)
    if len(sigmas) == 0 or window is None:
        return latent
    out, _ = sample(model, positive, negative, latent, sampler=choice,
                    sigmas=window, cfg=cfg, seed=seed, add_noise=add_noise, batch_index=batch_index,
                    noise_mask=noise_mask, tiling=tiling, progress=progress)
    return out


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
