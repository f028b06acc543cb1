"""Discrete DDPM noise schedules in σ-space, and the step schedules samplers walk.

A discrete schedule of T steps with ᾱ_t = Π(1 − β_s) is seen by the samplers through
σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), the noise level of the variance-exploding form
x = x0 + σ·ε (Karras et al. 2022), which equals z_t / sqrt(ᾱ_t) of the paper's
variance-preserving z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ldm_core.networks.config import ScheduleConfig


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


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """ᾱ_1..ᾱ_T in float64 as training noises with: Π(1 − β), rescaled to zero terminal SNR
    when the config says so (ᾱ_T then 4.9e-8, the finite stand-in `DiscreteSchedule` uses)."""
    abar = torch.cumprod(1 - make_betas(config), dim=0)
    if config.zero_terminal_snr:
        abar = 1 / (_rescale_zero_terminal_snr(((1 - abar) / abar) ** 0.5) ** 2 + 1)
    return abar


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
        self.log_sigmas = sigmas.log().float()  # log taken in float64, as ComfyUI does

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


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """SGM's uniform discretisation: steps + 1 points evenly spaced in t from T−1 to 0, the last
    dropped and replaced by σ = 0 (so the final step jumps from t ≈ T/steps straight to clean)."""
    start = float(schedule.timestep(schedule.sigma_max))
    end = float(schedule.timestep(schedule.sigma_min))
    ts = torch.linspace(start, end, steps + 1)[:-1]
    return torch.tensor([float(schedule.sigma(t)) for t in ts] + [0.0], dtype=torch.float32)


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Every (T/steps)-th trained σ counted down from σ_max (index T − 1 − ⌊k·T/steps⌋), then 0."""
    stride = len(schedule.sigmas) / steps
    picks = [float(schedule.sigmas[-(1 + int(k * stride))]) for k in range(steps)]
    return torch.tensor(picks + [0.0], dtype=torch.float32)


def ddim_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """DDIM's "uniform" timesteps t = 1, 1 + c, 1 + 2c, … with c = ⌊T/steps⌋, descending, then 0.

    As in ComfyUI the walk starts at index 1 and may yield a different count than `steps`
    when T is not a multiple of it; with σ_1 = 0 (zero-SNR edge) no zero is appended.
    """
    sigmas = schedule.sigmas
    zero_first = math.isclose(float(sigmas[1]), 0.0, abs_tol=1e-5)
    stride = max(len(sigmas) // (steps + 1 if zero_first else steps), 1)
    picks = [float(sigmas[t]) for t in range(1, len(sigmas), stride)]
    return torch.tensor(([] if zero_first else [0.0]) + picks, dtype=torch.float32).flip(0)


def beta_sigmas(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Beta-distribution timesteps (Lee et al. 2024, arXiv:2407.12173): t_k = round(F⁻¹(1 − k/steps)·(T−1))
    with F the Beta(α, β) CDF, trained σ at each distinct t, then 0. Repeated t are dropped, so
    small step counts on short schedules can give fewer steps."""
    from scipy.stats import beta as beta_dist  # comes with torchsde; only this scheduler needs it

    last = len(schedule.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(beta_dist.ppf(quantiles, alpha, beta) * last)
    picks, previous = [], None
    for t in ts:
        if t != previous:
            picks.append(float(schedule.sigmas[int(t)]))
        previous = t
    return torch.tensor(picks + [0.0], dtype=torch.float32)


def linear_quadratic_sigmas(schedule: DiscreteSchedule, steps: int, threshold_noise: float = 0.025,
                            linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's schedule, in fractions of σ_max: the first half of the steps fall linearly to
    1 − `threshold_noise`, the rest follow the quadratic that continues it with matching
    slope down to 0."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        n_lin = steps // 2 if linear_steps is None else linear_steps
        n_quad = steps - n_lin
        gap = n_lin - threshold_noise * steps
        a = gap / (n_lin * n_quad**2)
        b = threshold_noise / n_lin - 2 * gap / n_quad**2
        c = a * n_lin**2
        done = [i * threshold_noise / n_lin for i in range(n_lin)]
        done += [a * i**2 + b * i + c for i in range(n_lin, steps)]
        fractions = [1.0 - d for d in done + [1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * schedule.sigma_max


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: σ_k = (σ_max^(1/ρ) + k/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0."""
    ramp = torch.linspace(0, 1, steps)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((top + ramp * (bottom - top)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """`steps` σ evenly spaced in log σ from σ_max to σ_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """"Align your steps"' KL-optimal schedule: σ_k = tan((1 − u)·atan σ_max + u·atan σ_min), u = k/(n−1),
    then 0 (even steps in the angle atan σ). One step is [σ_max, 0] (ComfyUI divides by zero there: NaN)."""
    u = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    return _append_zero((u * math.atan(sigma_min) + (1 - u) * math.atan(sigma_max)).tan())


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _from_range(fn: Callable[[int, float, float], torch.Tensor]) -> Callable[[DiscreteSchedule, int], torch.Tensor]:
    """Adapt a schedule of (steps, σ_min, σ_max) to one that reads the range off the model."""
    def scheduler(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
        return fn(steps, float(schedule.sigma_min), float(schedule.sigma_max))
    scheduler.__doc__ = fn.__doc__
    return scheduler


# Order = ComfyUI's dropdown (its first entry, "simple", is the editor's default).
SCHEDULERS: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "simple": simple_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "karras": _from_range(karras_sigmas),
    "exponential": _from_range(exponential_sigmas),
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": _from_range(kl_optimal_sigmas),
}


def get_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, denoise: float = 1.0,
               discard_penultimate: bool = False) -> torch.Tensor:
    """The σ sequence for a sampler (KSampler's rules); `denoise` < 1 keeps only the last
    steps + 1 sigmas of a schedule for ⌊steps/denoise⌋ steps (img2img).

    `discard_penultimate`: plan one step more and drop the σ before the final 0, as ComfyUI's
    KSampler does for the samplers in `sampling.DISCARD_PENULTIMATE` (dpm_2, uni_pc, …).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; available: {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")

    def plan(n: int) -> torch.Tensor:
        if not discard_penultimate:
            return SCHEDULERS[scheduler](schedule, n)
        sigmas = SCHEDULERS[scheduler](schedule, n + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    if denoise > 0.9999:
        return plan(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return plan(int(steps / denoise))[-(steps + 1):]


def split_sigmas(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_0..σ_step, σ_step..σ_n): two schedules sharing σ_step, for running a sampling job in two parts."""
    if step < 0:
        raise ValueError(f"step must be 0 or more, got {step}")
    return sigmas[: step + 1], sigmas[step:]


def split_sigmas_denoise(sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split so the second part holds the last round(n·denoise) steps (n = len − 1), as ComfyUI's
    SplitSigmasDenoise: with denoise 0 the first part is empty and the second is the last σ."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be within 0..1, got {denoise}")
    steps = max(sigmas.shape[-1] - 1, 0)
    kept = round(steps * denoise)
    return sigmas[:-kept] if kept else sigmas[:0], sigmas[-(kept + 1):]


def flip_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Reversed schedule (ascending, for inversion); a leading 0 becomes 1e-4 so no step divides by 0."""
    if len(sigmas) == 0:
        return sigmas
    flipped = sigmas.flip(0)
    if flipped[0] == 0:
        flipped[0] = 0.0001
    return flipped
