"""Sampler nodes with ComfyUI's KSampler / KSamplerAdvanced inputs and semantics."""
from __future__ import annotations

from ._engine import engine
from .context import NodeContext
from .spec_helpers import combo, integer, node, number, out, socket
from .types import LATENT, MAX_SEED, Sockets

pipeline = engine("pipeline")
sampling = engine("sampling")
schedule = engine("schedule")
latents = engine("latent")

ENABLE = ("enable", "disable")


def _sample(model, positive, negative, latent_image: dict, progress, **kw):
    samples = latents.check(latent_image, "latent_image")
    out = pipeline.ksample(model, positive, negative, samples, batch_index=latent_image.get("batch_index"),
                           progress=progress or pipeline.null_progress, **kw)
    return (latents.with_samples(latent_image, out),)


def ksampler(ctx: NodeContext, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
             positive, negative, latent_image: dict, denoise: float = 1.0, progress=None):
    return _sample(model, positive, negative, latent_image, progress, seed=seed, steps=steps, cfg=cfg,
                   sampler=sampler_name, scheduler=scheduler, denoise=denoise)


def ksampler_advanced(ctx: NodeContext, model, add_noise: str, noise_seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, positive, negative, latent_image: dict,
                      start_at_step: int, end_at_step: int, return_with_leftover_noise: str, progress=None):
    return _sample(model, positive, negative, latent_image, progress, seed=noise_seed, steps=steps, cfg=cfg,
                   sampler=sampler_name, scheduler=scheduler, add_noise=add_noise == "enable",
                   start_step=start_at_step, last_step=end_at_step,
                   force_full_denoise=return_with_leftover_noise != "enable")


def _common(s: Sockets, seed_name: str) -> dict:
    return {
        "model": socket("model", s.model, "The diffusion model."),
        "seed": integer(seed_name, 0, 0, MAX_SEED, "Seed of the initial noise (drawn on the CPU: same image on every device).",
                        control_after_generate=True),
        "steps": integer("steps", 20, 1, 10000, "Denoising steps."),
        "cfg": number("cfg", 8.0, 0.0, 100.0, 0.1, "Classifier-free guidance scale.", round_=0.01),
        "sampler_name": combo("sampler_name", tuple(sampling.SAMPLERS), "The ODE/SDE solver."),
        "scheduler": combo("scheduler", tuple(schedule.SCHEDULERS), "How σ falls over the steps."),
        "positive": socket("positive", s.conditioning, "What the image should show."),
        "negative": socket("negative", s.conditioning, "What it should not show."),
        "latent_image": socket("latent_image", LATENT, "The latent to denoise."),
    }


def specs(s: Sockets, core: bool = False) -> list:
    c = _common(s, "seed")
    a = _common(s, "noise_seed")
    return [
        node("LDMKSampler", "KSampler (LDM)", "sampling", ksampler,
             [c["model"], c["seed"], c["steps"], c["cfg"], c["sampler_name"], c["scheduler"], c["positive"],
              c["negative"], c["latent_image"],
              number("denoise", 1.0, 0.0, 1.0, 0.01, "1: from pure noise; less keeps the input's structure.")],
             [out(LATENT, "LATENT", "The denoised latent.")],
             "Denoises a latent from seeded noise with classifier-free guidance.", hidden=("progress",)),
        node("LDMKSamplerAdvanced", "KSampler Advanced (LDM)", "sampling", ksampler_advanced,
             [a["model"], combo("add_noise", ENABLE), a["seed"], a["steps"], a["cfg"], a["sampler_name"],
              a["scheduler"], a["positive"], a["negative"], a["latent_image"],
              integer("start_at_step", 0, 0, 10000, "First step to run."),
              integer("end_at_step", 10000, 0, 10000, "Stop after this step."),
              combo("return_with_leftover_noise", ("disable", "enable"),
                    "enable: stop early with the remaining noise (for a second sampler).")],
             [out(LATENT, "LATENT")], "KSampler with a step window and optional noise.", hidden=("progress",)),
    ]
