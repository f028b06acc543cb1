"""Sampler nodes with ComfyUI's KSampler / KSamplerAdvanced inputs and semantics, and its
custom-sampling nodes: pick a sampler, build and cut σ schedules, run SamplerCustom."""
from __future__ import annotations

from ldm_core.imaging import latent as latents
from ldm_core.pipeline import jobs as pipeline
from ldm_core.sampling import sampler_table, schedule

from .context import NodeContext
from .socket_types import LATENT, MAX_SEED, SIGMAS, Sockets
from .spec_helpers import InputSpec, combo, integer, node, number, out, socket, spec

# ComfyUI core ids of the custom-sampling nodes → ours (ComfyUI names its inputs the same way).
CORE_NODES = {
    "KSampler": ("LDMKSampler", "KSampler", "sampling", (
        "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise")),
    "KSamplerAdvanced": ("LDMKSamplerAdvanced", "KSampler (Advanced)", "sampling", (
        "model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
        "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise")),
    "KSamplerSelect": ("LDMKSamplerSelect", "KSamplerSelect", "sampling/custom_sampling/samplers", ("sampler_name",)),
    "BasicScheduler": ("LDMBasicScheduler", "BasicScheduler", "sampling/custom_sampling/schedulers", (
        "model", "scheduler", "steps", "denoise")),
    "KarrasScheduler": ("LDMKarrasScheduler", "KarrasScheduler", "sampling/custom_sampling/schedulers", (
        "steps", "sigma_max", "sigma_min", "rho")),
    "ExponentialScheduler": ("LDMExponentialScheduler", "ExponentialScheduler",
                             "sampling/custom_sampling/schedulers", ("steps", "sigma_max", "sigma_min")),
    "SplitSigmas": ("LDMSplitSigmas", "SplitSigmas", "sampling/custom_sampling/sigmas", ("sigmas", "step")),
    "SplitSigmasDenoise": ("LDMSplitSigmasDenoise", "SplitSigmasDenoise", "sampling/custom_sampling/sigmas", (
        "sigmas", "denoise")),
    "FlipSigmas": ("LDMFlipSigmas", "FlipSigmas", "sampling/custom_sampling/sigmas", ("sigmas",)),
    "SamplerCustom": ("LDMSamplerCustom", "SamplerCustom", "sampling/custom_sampling", (
        "model", "add_noise", "noise_seed", "cfg", "positive", "negative", "sampler", "sigmas", "latent_image")),
}

ENABLE = ("enable", "disable")


def _sample(model, positive, negative, latent_image: dict, progress, **kw):
    samples = latents.check(latent_image, "latent_image")
    out = pipeline.ksample(model, positive, negative, samples, batch_index=latent_image.get("batch_index"),
                           noise_mask=latent_image.get("noise_mask"), progress=progress or pipeline.null_progress,
                           **kw)
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


def tiled_ksampler(ctx: NodeContext, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                   positive, negative, latent_image: dict, denoise: float, tile_size: int, tile_overlap: int,
                   blend: str, progress=None):
    if tile_overlap >= tile_size:
        raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size}); "
                         f"a quarter of the tile is a good start")
    tiling = pipeline.Tiling(model.latent_cells(tile_size), model.latent_cells(tile_overlap), blend)
    return _sample(model, positive, negative, latent_image, progress, seed=seed, steps=steps, cfg=cfg,
                   sampler=sampler_name, scheduler=scheduler, denoise=denoise, tiling=tiling)


def ksampler_select(ctx: NodeContext, sampler_name: str):
    return (sampler_table.select_sampler(sampler_name),)


def basic_scheduler(ctx: NodeContext, model, scheduler: str, steps: int, denoise: float):
    return (schedule.get_sigmas(model.schedule, scheduler, steps, denoise),)


def karras_scheduler(ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float, rho: float):
    return (schedule.karras_sigmas(steps, sigma_min, sigma_max, rho),)


def exponential_scheduler(ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float):
    return (schedule.exponential_sigmas(steps, sigma_min, sigma_max),)


def split_sigmas(ctx: NodeContext, sigmas, step: int):
    return schedule.split_sigmas(sigmas, step)


def split_sigmas_denoise(ctx: NodeContext, sigmas, denoise: float):
    return schedule.split_sigmas_denoise(sigmas, denoise)


def flip_sigmas(ctx: NodeContext, sigmas):
    return (schedule.flip_sigmas(sigmas),)


def sampler_custom(ctx: NodeContext, model, add_noise: bool, noise_seed: int, cfg: float, positive, negative,
                   sampler, sigmas, latent_image: dict, progress=None):
    samples = latents.check(latent_image, "latent_image")
    if not isinstance(sampler, sampler_table.SamplerChoice):
        raise ValueError(f"sampler: expected a SAMPLER from KSamplerSelect, got {type(sampler).__name__}")
    output, denoised = pipeline.sample(
        model, positive, negative, samples, sampler=sampler, sigmas=sigmas, cfg=cfg,
        seed=noise_seed, add_noise=add_noise, batch_index=latent_image.get("batch_index"), noise_mask=latent_image.get("noise_mask"),
        progress=progress or pipeline.null_progress)
    return latents.with_samples(latent_image, output), latents.with_samples(latent_image, denoised)


def _sigma_range(steps_tip: str = "Denoising steps.") -> list:
    return [integer("steps", 20, 1, 10000, steps_tip),
            number("sigma_max", 14.614642, 0.0, 5000.0, 0.01, "Noise level of the first step."),
            number("sigma_min", 0.0291675, 0.0, 5000.0, 0.01, "Noise level of the last step before 0.")]


def _custom_specs(s: Sockets) -> list:
    sig = lambda name="sigmas": socket(name, SIGMAS, "A σ schedule (descending noise levels).")  # noqa: E731
    halves = [out(SIGMAS, "high_sigmas", "The first part (high noise)."),
              out(SIGMAS, "low_sigmas", "The rest (low noise), starting at the shared σ.")]
    return [
        node("LDMKSamplerSelect", "Sampler Select (LDM)", "sampling/custom", ksampler_select,
             [combo("sampler_name", tuple(sampler_table.SAMPLERS), "The ODE/SDE solver.")],
             [out(s.sampler, "SAMPLER")], "Picks a sampler for SamplerCustom."),
        node("LDMBasicScheduler", "Basic Scheduler (LDM)", "sampling/custom", basic_scheduler,
             [socket("model", s.model, "The diffusion model (its trained noise levels)."),
              combo("scheduler", tuple(schedule.SCHEDULERS), "How σ falls over the steps."),
              integer("steps", 20, 1, 10000, "Denoising steps."),
              number("denoise", 1.0, 0.0, 1.0, 0.01, "1: the whole schedule; less keeps only its last steps.")],
             [out(SIGMAS, "SIGMAS")], "The σ schedule KSampler would use."),
        node("LDMKarrasScheduler", "Karras Scheduler (LDM)", "sampling/custom", karras_scheduler,
             [*_sigma_range(), number("rho", 7.0, 0.0, 100.0, 0.01, "Curvature: higher spends more steps at low noise.")],
             [out(SIGMAS, "SIGMAS")], "Karras et al. (2022) schedule between two noise levels."),
        node("LDMExponentialScheduler", "Exponential Scheduler (LDM)", "sampling/custom", exponential_scheduler,
             _sigma_range(), [out(SIGMAS, "SIGMAS")], "Noise levels evenly spaced in log σ."),
        node("LDMSplitSigmas", "Split Sigmas (LDM)", "sampling/custom", split_sigmas,
             [sig(), integer("step", 0, 0, 10000, "Where to cut: both parts share this step's σ.")], halves,
             "Cuts a schedule in two at a step, e.g. for two samplers."),
        node("LDMSplitSigmasDenoise", "Split Sigmas Denoise (LDM)", "sampling/custom", split_sigmas_denoise,
             [sig(), number("denoise", 1.0, 0.0, 1.0, 0.01, "Fraction of the steps that go to the second part.")],
             halves, "Cuts a schedule so the second part holds the last denoise·steps steps."),
        node("LDMFlipSigmas", "Flip Sigmas (LDM)", "sampling/custom", flip_sigmas, [sig()],
             [out(SIGMAS, "SIGMAS")], "Reverses a schedule (low to high noise), a leading 0 becomes 1e-4."),
        node("LDMSamplerCustom", "Sampler Custom (LDM)", "sampling/custom", sampler_custom,
             [socket("model", s.model, "The diffusion model."),
              InputSpec("add_noise", spec.BOOLEAN, True, tooltip="Add seeded noise first (off: the latent already has it)."),
              integer("noise_seed", 0, 0, MAX_SEED, "Seed of the noise (drawn on the CPU: same image on every device).",
                      control_after_generate=True),
              number("cfg", 8.0, 0.0, 100.0, 0.1, "Classifier-free guidance scale.", round_=0.01),
              socket("positive", s.conditioning, "What the image should show."),
              socket("negative", s.conditioning, "What it should not show."),
              socket("sampler", s.sampler, "From KSamplerSelect."),
              sig(), socket("latent_image", LATENT, "The latent to denoise.")],
             [out(LATENT, "output", "The sampled latent."),
              out(LATENT, "denoised_output", "The last denoised estimate x̂0.")],
             "Runs a chosen sampler over a given σ schedule.", hidden=("progress",)),
    ]


def _common(s: Sockets, seed_name: str) -> dict:
    return {
        "model": socket("model", s.model, "The diffusion model."),
        "seed": integer(seed_name, 0, 0, MAX_SEED, "Seed of the initial noise (drawn on the CPU: same image on every device).",
                        control_after_generate=True),
        "steps": integer("steps", 20, 1, 10000, "Denoising steps."),
        "cfg": number("cfg", 8.0, 0.0, 100.0, 0.1, "Classifier-free guidance scale.", round_=0.01),
        "sampler_name": combo("sampler_name", tuple(sampler_table.SAMPLERS), "The ODE/SDE solver."),
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
        node("LDMTiledKSampler", "Tiled KSampler (MultiDiffusion, LDM)", "sampling", tiled_ksampler,
             [c["model"], c["seed"], c["steps"], c["cfg"], c["sampler_name"], c["scheduler"], c["positive"],
              c["negative"], c["latent_image"],
              number("denoise", 1.0, 0.0, 1.0, 0.01, "1: from pure noise; less keeps the input's structure."),
              integer("tile_size", 512, 64, 4096, "Window size in pixels: the size the model was trained at.", step=64),
              integer("tile_overlap", 128, 0, 2048, "Pixels neighbouring windows share (more: smoother, slower).",
                      step=8),
              combo("blend", ("feather", "uniform"),
                    "feather: weights ramp down across overlaps; uniform: plain average (the MultiDiffusion paper).")],
             [out(LATENT, "LATENT", "The denoised latent.")],
             "KSampler for latents larger than the model was trained for: every step denoises overlapping windows "
             "and averages them (MultiDiffusion). Area and mask prompts stay placed on the whole image.",
             hidden=("progress",)),
        *_custom_specs(s),
    ]
