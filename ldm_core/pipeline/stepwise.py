"""The diffusion process taken apart: forward noising, one guided evaluation, one solver step, the schedule.

Everything works in the σ-space the samplers use (Karras et al. 2022): x = z0 + σ·ε with
z0 the model-space latent (`DiffusionModel.latent_in`: raw VAE latent × scale factor).
It is the paper's variance-preserving z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε divided by
sqrt(ᾱ_t), with σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) (see `vp_from_sigma_space`). Chained —
forward_diffuse, then (denoise, sampler_step) per step — these give KSampler's result
bit for bit for one-evaluation solvers (Euler, DDIM with η = 0), because they run the
same operations: the same noise draw, the same guider, the registered solver itself.

LATENTs passed between these parts hold raw latents as always; so that the ×scale ÷scale
round trip costs no float rounding, each also carries its model-space tensor under
`MODEL_SPACE_KEY`, used only while its "samples" is still the very tensor it was made with.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm_core.conditioning.cond import Cond
from ldm_core.conditioning.inpaint import with_concat
from ldm_core.imaging.latent import with_samples
from ldm_core.loading.model import DiffusionModel
from ldm_core.sampling.noise import noise_latent
from ldm_core.sampling.sampler_table import SAMPLERS
from ldm_core.sampling.schedule import DiscreteSchedule, get_sigmas

MODEL_SPACE_KEY = "ldm_model_space"
# Solvers that take one model evaluation per step and carry no state or noise between steps
# (the table's `one_step` trait): one call on [σ_i, σ_i+1] with the step's x̂0 is exactly their
# step inside a full run.
STEP_SAMPLERS = tuple(name for name, entry in SAMPLERS.items() if entry.one_step)
LEVEL_TYPES = ("sigma", "timestep")
PLOT_QUANTITIES = ("sigma", "log_sigma", "alphas_cumprod")


class PartsError(ValueError):
    """Unusable input to a diffusion part; the message names it and says what to do."""


# --- LATENT ↔ model space -------------------------------------------------------------------

def to_model_space(model: DiffusionModel, latent: dict) -> torch.Tensor:
    """The model-space tensor of a LATENT: its exact copy when still valid, else latent_in(samples)."""
    kept = latent.get(MODEL_SPACE_KEY)
    if kept is not None and kept[0] is latent["samples"] and kept[2] == model.config.latent_scale:
        return kept[1]
    return model.latent_in(latent["samples"].float())


def from_model_space(model: DiffusionModel, x: torch.Tensor, like: dict | None = None) -> dict:
    """A LATENT for model-space `x` (raw samples = latent_out(x), exact copy kept alongside);
    other keys of `like` (batch_index, ...) carried along."""
    samples = model.latent_out(x.float().cpu())
    out = with_samples(like or {}, samples)
    out[MODEL_SPACE_KEY] = (samples, x, model.config.latent_scale)
    return out


def level_to_sigma(schedule: DiscreteSchedule, level: float, level_type: str = "sigma") -> float:
    """A noise level given as σ, or as a (fractional) training timestep t in [0, T − 1]."""
    if level_type == "sigma":
        sigma = float(level)
    elif level_type == "timestep":
        last = len(schedule.sigmas) - 1
        if not 0 <= level <= last:
            raise PartsError(f"timestep must be in 0..{last}, got {level}")
        sigma = float(schedule.sigma(torch.tensor(float(level))))
    else:
        raise PartsError(f"level_type must be one of {LEVEL_TYPES}, got {level_type!r}")
    if not math.isfinite(sigma) or sigma < 0:
        raise PartsError(f"sigma must be a finite number ≥ 0, got {sigma}")
    return sigma


# --- the parts ------------------------------------------------------------------------------

def forward_diffuse(schedule: DiscreteSchedule, z0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """q(x | z0) at noise level σ in σ-space: x = z0 + σ·ε.

    At σ ≥ σ_max (the start of a full-denoise run) the noise is scaled by sqrt(1 + σ²)
    instead, as KSampler does: there the model input c_in·x = x/sqrt(1 + σ²) is then unit
    variance, as pure noise z_T is in the variance-preserving form.
    """
    return noise_latent(schedule, torch.tensor([sigma], dtype=torch.float32), noise, z0)


def vp_from_sigma_space(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """z_t = x·sqrt(ᾱ) = x / sqrt(1 + σ²): the paper's variance-preserving latent for x."""
    return x / math.sqrt(1.0 + sigma * sigma)


@torch.inference_mode()
def denoise(guider, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided evaluation at σ > 0: (ε̂, x̂0) with x̂0 = D(x, σ) and ε̂ = (x − x̂0)/σ."""
    if not sigma > 0:
        raise PartsError(f"sigma must be > 0 to evaluate the model (σ = 0 is the clean end), got {sigma}")
    s = torch.tensor(sigma, dtype=torch.float32, device=x.device)
    denoised = guider(x, s * x.new_ones([x.shape[0]]))
    return (x - denoised) / s, denoised


def evaluate(model: DiffusionModel, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float,
             x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`denoise` with the guider KSampler builds (inpaint models get their extra input from the
    conditioning, or ComfyUI's blank default: there is no noise mask here)."""
    from ldm_core.pipeline.jobs import make_guider  # local: pipeline is the higher layer

    positive, negative = (with_concat(model.config, c, x.shape, None, None) for c in (positive, negative))
    return denoise(make_guider(model, positive, negative, cfg, x.shape), x, sigma)


def sampler_step(sampler: str, x: torch.Tensor, denoised: torch.Tensor, sigma: float,
                 sigma_next: float) -> torch.Tensor:
    """Advance x from σ to σ_next given x̂0 at σ, with the registered solver itself (Euler:
    x + (x − x̂0)/σ·(σ_next − σ); DDIM with η = 0 is the same step in σ-space)."""
    if sampler not in STEP_SAMPLERS:
        raise PartsError(f"sampler {sampler!r} cannot run one step at a time; use one of {list(STEP_SAMPLERS)}")
    if not sigma > 0 or sigma_next < 0:
        raise PartsError(f"need sigma > 0 and sigma_next ≥ 0, got {sigma} → {sigma_next}")
    if denoised.shape != x.shape:
        raise PartsError(f"denoised {tuple(denoised.shape)} and latent {tuple(x.shape)} differ in shape")
    sigmas = torch.tensor([sigma, sigma_next], dtype=torch.float32, device=x.device)
    return SAMPLERS[sampler](lambda _x, _s: denoised, x, sigmas)


# --- the schedule as a picture --------------------------------------------------------------

def schedule_values(schedule: DiscreteSchedule, scheduler: str, steps: int, quantity: str = "sigma",
                    denoise: float = 1.0) -> torch.Tensor:
    """σ_i of a run (steps + 1 values, last 0), as σ, log σ (the final 0 left out) or ᾱ = 1/(1 + σ²)."""
    sigmas = get_sigmas(schedule, scheduler, steps, denoise).double()
    if quantity == "sigma":
        return sigmas
    if quantity == "log_sigma":
        return sigmas[sigmas > 0].log()
    if quantity == "alphas_cumprod":
        return 1 / (1 + sigmas**2)
    raise PartsError(f"quantity must be one of {PLOT_QUANTITIES}, got {quantity!r}")


MARGIN = (56, 16, 16, 36)  # left, top, right, bottom: room for the labels
CURVE = (31, 90, 200)


def plot_points(values: Sequence[float], width: int, height: int) -> list[tuple[int, int]]:
    """Pixel (x, y) of each value: step i evenly across the plot box, value min..max bottom..top."""
    left, top, right, bottom = MARGIN
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(values) - 1, 1)
    w, h = width - left - right - 1, height - top - bottom - 1
    return [(left + round(i * w / n), top + round((hi - v) / span * h)) for i, v in enumerate(values)]


def render_plot(values: Sequence[float], width: int = 512, height: int = 320, ylabel: str = "sigma",
                xlabel: str = "step") -> torch.Tensor:
    """A line plot of `values` over their index, axes labelled, as an IMAGE [1, H, W, 3] in 0..1."""
    left, top, right, bottom = MARGIN
    if width < left + right + 16 or height < top + bottom + 16:
        least = f"{left + right + 16}x{top + bottom + 16}"
        raise PartsError(f"plot size {width}x{height} is too small; use at least {least}")
    values = [float(v) for v in values]
    if not values:
        raise PartsError("nothing to plot: the schedule is empty (denoise 0?)")
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = left, top, width - right - 1, height - bottom - 1
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    points = plot_points(values, width, height)
    if len(points) > 1:
        draw.line(points, fill=CURVE, width=2)
    for x, y in points:
        draw.rectangle([x - 2, y - 2, x + 2, y + 2], fill=CURVE)
    draw.text((4, y0), f"{max(values):.3g}", fill="black")
    draw.text((4, y1 - 10), f"{min(values):.3g}", fill="black")
    draw.text((4, (y0 + y1) // 2), ylabel, fill="black")
    draw.text((x0, y1 + 6), "0", fill="black")
    draw.text((x1 - 16, y1 + 6), str(len(values) - 1), fill="black")
    draw.text(((x0 + x1) // 2 - 12, y1 + 18), xlabel, fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
