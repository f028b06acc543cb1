"""Discrete DDPM noise schedules in σ-space, and the step schedules samplers walk.

A discrete schedule of T steps with ᾱ_t = Π(1 − β_s) is seen by the samplers through
σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), the noise level of the variance-exploding form
x = x0 + σ·ε (Karras et al. 2022), which equals z_t / sqrt(ᾱ_t) of the paper's
variance-preserving z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import ScheduleConfig


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """β_1..β_T in float64. "scaled_linear" is linear in sqrt(β) (Stable Diffusion)."""
    n = config.timesteps
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.linear_start**0.5, config.linear_end**0.5, n, dtype=torch.float64) ** 2
    if config.beta_schedule == "linear":
        return torch.linspace(config.linear_start, config.linear_end, n, dtype=torch.float64)
    # cosine (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), β clipped at 0.999
    s = 8e-3
    t = torch.arange(n + 1, dtype=torch.float64) / n + s
    abar = torch.cos(t / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)


def _rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift/scale sqrt(ᾱ) so the last step has zero SNR (σ_T → very large)."""
    abar_sqrt = (1 / (sigmas**2 + 1)).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    abar[-1] = 4.8973451890853435e-08  # keeps σ_T finite, as the reference implementations do
    return ((1 - abar) / abar) ** 0.5


class DiscreteSchedule:
    """σ_t of a trained discrete-time model, with σ ↔ t conversion.

    `timestep(σ)` quantises to the nearest trained step in log σ (what the model was
    trained on, and what ComfyUI feeds its models); `sigma(t)` interpolates log σ
    linearly for fractional t.
    """

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        abar = torch.cumprod(1 - make_betas(config), dim=0)
        sigmas = ((1 - abar) / abar) ** 0.5
        if config.zero_terminal_snr:
            sigmas = _rescale_zero_terminal_snr(sigmas)
        self.sigmas = sigmas.float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest trained step index (as float) for each σ; same shape as `sigma`."""
        log_sigma = sigma.float().log().to(self.log_sigmas.device)
        dists = (log_sigma.reshape(1, -1) - self.log_sigmas[:, None]).abs()
        return dists.argmin(dim=0).reshape(sigma.shape).float().to(sigma.device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().clamp(0, len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def alphas_cumprod(self) -> torch.Tensor:
        return 1 / (self.sigmas.double() ** 2 + 1)


def normal_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """ComfyUI's "normal" schedule: `steps` points evenly spaced in t from σ_max to σ_min, then 0.

    Returns steps + 1 sigmas (descending, last 0). A schedule whose σ_min is already 0
    gets one extra step instead of the appended zero.
    """
    start = float(schedule.timestep(schedule.sigma_max))
    end = float(schedule.timestep(schedule.sigma_min))
    append_zero = not math.isclose(float(schedule.sigma(torch.tensor(end))), 0.0, abs_tol=1e-5)
    ts = torch.linspace(start, end, steps if append_zero else steps + 1)
    sigmas = [float(schedule.sigma(t)) for t in ts]
    if append_zero:
        sigmas.append(0.0)
    return torch.tensor(sigmas, dtype=torch.float32)


SCHEDULERS: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "normal": normal_sigmas,
}


def get_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The σ sequence for a sampler; `denoise` < 1 keeps only the last part (img2img)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; available: {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if denoise >= 1.0:
        return SCHEDULERS[scheduler](schedule, steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    total = int(steps / denoise)
    return SCHEDULERS[scheduler](schedule, total)[-(steps + 1):]
