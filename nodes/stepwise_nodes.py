"""The model's parts as nodes: forward diffusion, one guided evaluation, one solver step, the schedule."""
from __future__ import annotations

from ldm_core.imaging import latent as latents
from ldm_core.pipeline import stepwise as parts
from ldm_core.sampling import schedule
from ldm_core.sampling.noise import prepare_noise

from .context import NodeContext
from .socket_types import IMAGE, LATENT, MAX_SEED, Sockets
from .spec_helpers import combo, integer, node, number, out, socket

SIGMA_MAX = 1e4


def _plain(latent: dict, what: str):
    latents.check(latent, what)
    if "noise_mask" in latent:
        raise ValueError(f"{what} has a noise mask; the diffusion parts do not inpaint: use a KSampler, "
                         "or drop the mask")


def forward_diffusion(ctx: NodeContext, model, latent: dict, seed: int, level: float, level_type: str):
    _plain(latent, "latent")
    sigma = parts.level_to_sigma(model.schedule, level, level_type)
    noise = prepare_noise(latent["samples"].shape, seed, latent.get("batch_index"))
    x = parts.forward_diffuse(model.schedule, parts.to_model_space(model, latent), sigma, noise)
    return (parts.from_model_space(model, x, latent), sigma)


def denoise(ctx: NodeContext, model, positive, negative, cfg: float, latent: dict, sigma: float):
    _plain(latent, "latent")
    x = parts.to_model_space(model, latent)
    eps, x0 = parts.evaluate(model, positive, negative, cfg, x.to(model.device), sigma)
    return (parts.from_model_space(model, eps, latent), parts.from_model_space(model, x0, latent))


def sampler_step(ctx: NodeContext, model, latent: dict, denoised: dict, sampler_name: str, sigma: float,
                 sigma_next: float):
    _plain(latent, "latent")
    x = parts.to_model_space(model, latent)
    latents.check(denoised, "denoised")
    d = parts.to_model_space(model, denoised)
    return (parts.from_model_space(model, parts.sampler_step(sampler_name, x, d, sigma, sigma_next), latent),)


def schedule_plot(ctx: NodeContext, model, scheduler: str, steps: int, denoise: float, quantity: str,
                  width: int, height: int):
    values = parts.schedule_values(model.schedule, scheduler, steps, quantity, denoise)
    return (parts.render_plot(values.tolist(), width, height, ylabel=quantity),)


def _sigma(name: str, tooltip: str):
    return number(name, 1.0, 0.0, SIGMA_MAX, 0.001, tooltip, round_=False)


def specs(s: Sockets, core: bool = False) -> list:
    step_samplers = parts.STEP_SAMPLERS
    return [
        node("LDMForwardDiffusion", "Forward Diffusion (LDM)", "parts", forward_diffusion,
             [socket("model", s.model, "Gives the latent scale and the noise schedule."),
              socket("latent", LATENT, "The clean latent z0."),
              integer("seed", 0, 0, MAX_SEED, "Seed of ε (the same draw as a KSampler with this seed)."),
              number("level", 14.6146, 0.0, SIGMA_MAX, 0.001, "The noise level: σ, or a training timestep t.",
                     round_=False),
              combo("level_type", parts.LEVEL_TYPES, "Whether level is σ or a timestep t (0..T−1).")],
             [out(LATENT, "LATENT", "x = z0 + σ·ε (σ-space; at σ_max the noise is scaled by sqrt(1+σ²))."),
              out("FLOAT", "sigma", "The σ used.")],
             "Noises a clean latent to a chosen level with the closed-form forward process q(x_t | x_0)."),
        node("LDMDenoise", "Denoise Once (LDM)", "parts", denoise,
             [socket("model", s.model), socket("positive", s.conditioning), socket("negative", s.conditioning),
              number("cfg", 8.0, 0.0, 100.0, 0.1, "Classifier-free guidance scale.", round_=0.01),
              socket("latent", LATENT, "The noisy latent x at σ."),
              _sigma("sigma", "The noise level of the latent (σ > 0).")],
             [out(LATENT, "noise", "Predicted noise ε̂ = (x − x̂0)/σ."),
              out(LATENT, "denoised", "Predicted clean latent x̂0 = D(x, σ), guided.")],
             "One guided model evaluation: predicted noise and predicted clean latent."),
        node("LDMSamplerStep", "Sampler Step (LDM)", "parts", sampler_step,
             [socket("model", s.model, "Gives the latent scale."), socket("latent", LATENT, "x at σ."),
              socket("denoised", LATENT, "x̂0 at σ (from Denoise Once)."),
              combo("sampler_name", step_samplers, "A solver with one evaluation per step."),
              _sigma("sigma", "Current noise level σ_i."), _sigma("sigma_next", "Next noise level σ_i+1 (0: done).")],
             [out(LATENT, "LATENT", "x at σ_next.")],
             "Advances one solver step from σ_i to σ_i+1 (Euler; DDIM with η = 0 is the same step)."),
        node("LDMSchedulePlot", "Schedule Plot (LDM)", "parts", schedule_plot,
             [socket("model", s.model), combo("scheduler", tuple(schedule.SCHEDULERS)),
              integer("steps", 20, 1, 10000, "Sampling steps."),
              number("denoise", 1.0, 0.0, 1.0, 0.01, "Fraction of the schedule run (img2img)."),
              combo("quantity", parts.PLOT_QUANTITIES, "What to plot over the steps."),
              integer("width", 512, 128, 4096, "Picture width."), integer("height", 320, 96, 4096, "Picture height.")],
             [out(IMAGE, "IMAGE", "The plot.")],
             "Plots σ (or log σ, or ᾱ = 1/(1+σ²)) over the sampling steps."),
    ]
