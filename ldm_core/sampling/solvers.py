"""The samplers: small pure functions that walk a σ schedule with a denoiser D(x, σ) → x̂0.

Every sampler has one signature, `sample_<name>(denoiser, x, sigmas, *, callback, seed,
**options) -> x`, with its options (eta, s_noise, …) as keyword defaults. x lives in the
variance-exploding form x = x0 + σ·ε (Karras et al. 2022); "d" is the probability-flow ODE
slope dx/dσ = (x − D(x, σ))/σ and λ = −log σ is the half log-SNR the DPM-Solvers step in.

Randomness: every random draw comes from `seed`, on the CPU (so a seed gives the same image
on every device; None: torch's default seed, never the global RNG). Ancestral samplers draw
N(0, I) noise in sequence from a CPU generator seeded with it, as ComfyUI does; the SDE
samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) instead read increments of one Brownian path
(torchsde's BrownianTree, entropy = the seed), so their noise at a step does not depend on how
many draws came before.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,C,h,w], sigma [B]) -> x0
StepCallback = Callable[[dict[str, Any]], None]
NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (σ, σ_next) -> N(0, I) shaped like x


class Sampler(Protocol):
    def __call__(self, denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor: ...


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE: (x − D(x, σ)) / σ."""
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """Split a step σ → σ_next into a deterministic part down to σ_down and fresh noise σ_up:
    σ_up = min(σ_next, η·sqrt(σ_next²(σ² − σ_next²)/σ²)), σ_down = sqrt(σ_next² − σ_up²), so the
    marginal at σ_next is kept. η = 1 is DDPM's ancestral step, η = 0 the ODE (DDIM η)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def gaussian_noise(x: torch.Tensor, seed: int | None) -> NoiseFn:
    """Fresh N(0, I) draws shaped like x, in sequence from a CPU generator seeded with `seed` (then
    moved to x's device)."""
    generator = torch.Generator("cpu")
    if seed is not None:
        generator.manual_seed(int(seed))

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return draw


class BrownianNoise:
    """Unit-variance increments of one Brownian path W over σ: (W(σ_next) − W(σ))/sqrt|σ_next − σ|.

    Backed by torchsde's BrownianTree on the CPU over [smallest positive σ, largest σ],
    entropy = `seed`: the same seed gives the same path whatever the step schedule, and nested
    sub-steps (dpmpp_sde's midpoint) see consistent increments. Same construction as ComfyUI's
    SDE samplers, so equal seeds give equal noise.
    """

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> None:
        try:
            import torchsde
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("the SDE samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) need torchsde: "
                              "pip install torchsde") from None
        positive = sigmas[sigmas > 0]
        t0, t1 = positive.min().detach().cpu().float(), sigmas.max().detach().cpu().float()
        self.device = x.device
        w0 = torch.zeros(x.shape, dtype=x.dtype)
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():  # σ_max vs the tree's float32 end differ in the last bit
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = self.tree(lo.detach().cpu().float(), hi.detach().cpu().float()) * sign
        return w.to(self.device, a.dtype) / (b - a).abs().sqrt()


def brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, seed: int | None) -> NoiseFn:
    """`BrownianNoise` with entropy `seed` (None: torch's default seed, as `gaussian_noise`)."""
    return BrownianNoise(x, sigmas, torch.Generator("cpu").initial_seed() if seed is None else int(seed))


def _report(callback: StepCallback | None, i: int, x: torch.Tensor, sigma: torch.Tensor,
            denoised: torch.Tensor, total: int) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised, "total": total})


# --- first order and Karras' second-order ODE steps ---------------------------------------------

@torch.no_grad()
def sample_euler(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        x = x + to_d(x, sigmas[i] * ones, denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           callback: StepCallback | None = None, seed: int | None = None,
                           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler step down to σ_down, then s_noise·σ_up of fresh noise (see `ancestral_step`)."""
    noise = gaussian_noise(x, seed)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
    """Heun's method (trapezoidal corrector, Karras et al. 2022 Algorithm 1); the last step to σ = 0 is Euler."""
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * ones))
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(denoiser: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
               d: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2 style midpoint: slope at σ_mid = sqrt(σ·σ_to) (geometric mean) carries x to σ_to."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * x.new_ones([x.shape[0]])))
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
    """Second-order midpoint steps in log σ (after DPM-Solver-2); the last step to σ = 0 is Euler."""
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_step(denoiser, x, sigmas[i], sigmas[i + 1], d)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           callback: StepCallback | None = None, seed: int | None = None,
                           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """`sample_dpm_2` down to σ_down, then s_noise·σ_up of fresh noise."""
    noise = gaussian_noise(x, seed)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(denoiser, x, sigmas[i], sigma_down, d)
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Linear multistep weights c_j = ∫_{σ_i}^{σ_i+1} ℓ_j(τ) dτ, ℓ_j the Lagrange basis polynomial
    on the nodes σ_i, σ_i−1, …, σ_i−order+1 (integrated exactly, in float64)."""
    if order - 1 > i:
        raise ValueError(f"order {order} needs {order} past steps; step {i} has {i + 1}")
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        others = [n for k, n in enumerate(nodes) if k != j]
        basis = np.poly1d(others, r=True) / float(np.prod([node - n for n in others]))
        integral = np.polyint(basis)
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


@torch.no_grad()
def sample_lms(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
               callback: StepCallback | None = None, seed: int | None = None,
               order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth on the last `order` slopes, variable step); the last step
    to σ = 0 returns the denoised estimate."""
    points = sigmas.detach().cpu().double().tolist()
    ones = x.new_ones([x.shape[0]])
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        ds = [*ds[-(order - 1):], to_d(x, sigmas[i], denoised)] if order > 1 else [to_d(x, sigmas[i], denoised)]
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            weights = lms_coefficients(points, i, min(i + 1, order))
            x = x + sum(w * d for w, d in zip(weights, reversed(ds)))
    return x


# --- DPM-Solver++ family (Lu et al. 2022), steps in λ = −log σ ----------------------------------

@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                              callback: StepCallback | None = None, seed: int | None = None,
                              eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S): a single-step second-order exponential integrator to σ_down through the
    midpoint in λ, x_next = (σ_down/σ)·x − expm1(−h)·D(x_mid, σ_mid); then ancestral noise."""
    noise = gaussian_noise(x, seed)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = sigmas[i].log().neg(), sigma_down.log().neg()
            h = lam_next - lam
            lam_mid = lam + h / 2
            x_2 = ((-lam_mid).exp() / (-lam).exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoiser(x_2, (-lam_mid).exp() * ones)
            x = ((-lam_next).exp() / (-lam).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                     callback: StepCallback | None = None, seed: int | None = None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE (stochastic 2S): two ancestral exponential-integrator sub-steps, to
    λ_s + r·h and then to λ_t with the blend (1 − 1/2r)·D_s + (1/2r)·D_mid, noise from one
    Brownian path. The last step to σ = 0 returns the denoised estimate."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise(x, sigmas, seed)
    ones = x.new_ones([x.shape[0]])
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lam_t - lam_s
        sigma_mid = (-(lam_s + r * h)).exp()
        # sub-step 1: to σ_mid
        sd, su = ancestral_step(sigmas[i], sigma_mid, eta)
        h_ = sd.log().neg() - lam_s
        x_2 = (-h_).exp() * x - (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + noise(sigmas[i], sigma_mid) * s_noise * su
        denoised_2 = denoiser(x_2, sigma_mid * ones)
        # sub-step 2: to σ_next with the blended estimate
        sd, su = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        h_ = sd.log().neg() - lam_s
        x = (-h_).exp() * x - (-h_).expm1() * ((1 - fac) * denoised + fac * denoised_2)
        if eta > 0 and s_noise > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): x_next = (σ_next/σ)·x − expm1(−h)·D̃ with D̃ = (1 + 1/2r)·D_i − (1/2r)·D_i−1,
    r = h_last/h (multistep second order); first order on the first step and the step to σ = 0."""
    ones = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        lam, lam_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lam_next - lam
        if old_denoised is None or sigmas[i + 1] == 0:
            blend = denoised
        else:
            r = (lam - sigmas[i - 1].log().neg()) / h
            blend = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = ((-lam_next).exp() / (-lam).exp()) * x - (-h).expm1() * blend
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                        callback: StepCallback | None = None, seed: int | None = None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE: x_next = (σ_next/σ)·e^(−ηh)·x + (1 − e^(−(1+η)h))·D + correction from
    D − D_prev ("midpoint" or "heun"), + σ_next·sqrt(1 − e^(−2ηh))·s_noise·ΔW (Brownian)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise(x, sigmas, seed)
    ones = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()  # 1 in this (variance-exploding) form
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                        callback: StepCallback | None = None, seed: int | None = None,
                        eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: the 2M SDE step plus a second divided difference of the last three
    denoised estimates (φ₂, φ₃ weights of the exponential integrator); lower order while history builds."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise(x, sigmas, seed)
    ones = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                x = x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- the discrete-time samplers of the DDPM/LDM papers, in σ-space -------------------------------

@torch.no_grad()
def sample_ddpm(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) between the schedule's levels: in the
    variance-preserving z = x/sqrt(1 + σ²) with ᾱ = 1/(1 + σ²) and α = ᾱ/ᾱ_next,
    z_next = (z − (1 − α)/sqrt(1 − ᾱ)·ε̂)/sqrt(α) + sqrt((1 − α)(1 − ᾱ_next)/(1 − ᾱ))·z_noise."""
    noise = gaussian_noise(x, seed)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * ones)
        _report(callback, i, x, sigma, denoised, len(sigmas) - 1)
        eps = (x - denoised) / sigma
        abar, abar_next = 1 / (sigma * sigma + 1), 1 / (sigma_next * sigma_next + 1)
        alpha = abar / abar_next
        z = x / torch.sqrt(1.0 + sigma**2.0)
        z = (1.0 / alpha).sqrt() * (z - (1 - alpha) * eps / (1 - abar).sqrt())
        if sigma_next > 0:
            z = z + ((1 - alpha) * (1.0 - abar_next) / (1.0 - abar)).sqrt() * noise(sigma, sigma_next)
            z = z * torch.sqrt(1.0 + sigma_next**2.0)
        x = z
    return x


@torch.no_grad()
def sample_lcm(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
               callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
    """Latent-consistency multistep sampling: jump to the denoised estimate, re-noise to σ_next."""
    noise = gaussian_noise(x, seed)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        x = denoised
        if sigmas[i + 1] > 0:
            x = noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


@torch.no_grad()
def sample_ddim(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: StepCallback | None = None, seed: int | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12). Its update
        z_next = sqrt(ᾱ_next)·x̂0 + sqrt(1 − ᾱ_next − s²)·ε̂ + s·z_noise,
        s = η·sqrt((1 − ᾱ_next)/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ_next),
    divided by sqrt(ᾱ_next) becomes x_next = x̂0 + σ_down·ε̂ + σ_up·z_noise with
    σ_up = s/sqrt(ᾱ_next) = η·sqrt(σ_next²(σ² − σ_next²)/σ²) (`ancestral_step`), written as
    x + ε̂·(σ_down − σ). η = 0 is deterministic and equals Euler step for step (ComfyUI's "ddim");
    η = 1 is the ancestral step of DDPM's posterior (same as euler_ancestral)."""
    noise = gaussian_noise(x, seed) if eta > 0 else None
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * ones)
        _report(callback, i, x, sigmas[i], denoised, len(sigmas) - 1)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i] * ones, denoised) * (sigma_down - sigmas[i])
        if noise is not None and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


# Adams–Bashforth weights of PLMS for 1..4 known slopes (newest first).
_PLMS_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
# Where Adams–Bashforth of order 1..4 is stable on the negative real axis: |h·λ| < 2, 1, 6/11, 3/10.
_AB_STABLE = (2.0, 1.0, 6 / 11, 3 / 10)


def plms_order(sigma: float, sigma_next: float, known: int) -> int:
    """The Adams–Bashforth order PLMS uses for the step σ → σ_next with `known` slopes (this one
    included): the highest of 1..min(4, known) that is stable for the step.

    Along dx/dσ = ε = (x − x̂0)/σ a deviation δ of x moves ε by δ/σ, so for the step
    h = σ_next − σ the test equation has h·λ = −r with r = 1 − σ_next/σ, the step's relative
    fall in σ. Order k is used only where r lies strictly inside its stability interval (r < 2, 1,
    6/11, 3/10 for k = 1..4): evenly spaced timesteps (`ddim_uniform`) end with σ ≈ 0.23 → 0.04
    (r = 0.82), where the 4th-order weights amplify the differences between past slopes instead of
    damping them. The final step to σ = 0 (r = 1) is thus always first order, x = x̂0, as in
    DPM-Solver++ and UniPC. Fine grids keep order 4 to the end, as in the paper."""
    r = 1.0 - sigma_next / sigma
    return max((k for k in range(1, min(4, known) + 1) if r < _AB_STABLE[k - 1]), default=1)


@torch.no_grad()
def sample_plms(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: StepCallback | None = None, seed: int | None = None,
                stable_order: bool = True) -> torch.Tensor:
    """PLMS, the pseudo linear multistep sampler of the LDM paper (Liu et al. 2022, PNDM).

    Each step is a DDIM (η = 0) step with ε̂ replaced by a combination ε' of past predictions
    using fixed Adams–Bashforth weights (equal-step, as in the paper): (55ε₀ − 59ε₁ + 37ε₂ − 9ε₃)/24
    once four are known, lower order before. The first step uses the pseudo improved Euler
    ε' = (ε(x, σ) + ε(x_Euler, σ_next))/2 (two evaluations), except when σ_next = 0.
    In σ-space ε̂ = (x − x̂0)/σ is the ODE slope and the DDIM step is x_next = x + ε'·(σ_next − σ).

    `stable_order` (default) lowers the order of a step whose relative fall in σ is too large for
    it to be stable (`plms_order`); this only changes the last few steps of coarse grids. On the
    embedded model PLMS on 20 `ddim_uniform` steps drew the right objects for 0.46 of the bench's
    prompts with the paper's fixed order and 0.88 with this (DDPM at 1000 steps: 0.94).
    `stable_order=False` is the paper's algorithm exactly (diffusers' PNDMScheduler).
    """
    ones = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []  # the last (at most 3) earlier slopes, oldest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * ones)
        _report(callback, i, x, sigma, denoised, len(sigmas) - 1)
        eps = to_d(x, sigma * ones, denoised)
        if not history and sigma_next > 0:
            x_euler = x + eps * (sigma_next - sigma)
            eps_next = to_d(x_euler, sigma_next * ones, denoiser(x_euler, sigma_next * ones))
            eps_prime = (eps + eps_next) / 2
        else:
            order = min(4, len(history) + 1)
            if stable_order:
                order = plms_order(float(sigma), float(sigma_next), order)
            recent = [eps, *reversed(history[len(history) - order + 1:])]
            eps_prime = sum(w * e for w, e in zip(_PLMS_WEIGHTS[order - 1], recent))
        history = [*history[-2:], eps]
        x = x + eps_prime * (sigma_next - sigma)
    return x


# --- UniPC (Zhao et al. 2023), multistep predictor-corrector on x̂0 ------------------------------

def _vp(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α, σ_vp, λ) of the variance-preserving form z = α·x0 + σ_vp·ε with α = 1/sqrt(1 + σ²):
    UniPC is stated there. Computed through log α in the σ's dtype, the way ComfyUI's solver
    does, so results agree to rounding (the closed form λ = −log σ differs from it by ~2%
    at σ = 10⁻³ in float32)."""
    log_alpha = 0.5 * torch.log(1 / (sigma * sigma + 1))
    log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))
    return log_alpha.exp(), log_std.exp(), log_alpha - log_std


def _unipc_update(data_pred: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                  model_prev: list[torch.Tensor], sigma_prev: list[torch.Tensor], sigma_t: torch.Tensor,
                  order: int, variant: str, use_corrector: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniPC step of the VP state z from σ_prev[-1] to σ_t with data prediction m = x̂0 and
    B(h) = h ("bh1") or e^h − 1 ("bh2"), h = λ_t − λ_s.

    Predictor UniP: z_t = (σ_vp,t/σ_vp,s)·z − α_t(e^(−h) − 1)·m_0 − α_t·B(h)·Σ ρ_k·D_k with
    D_k = (m_k − m_0)/r_k, r_k = (λ_k − λ_s)/h, and ρ solving R ρ = (φ-moments)/B(h);
    corrector UniC evaluates m at z_t and redoes the step including that slope.
    Returns (z_t, x̂0 at z_t, or None without the corrector)."""
    _, std_s, lam_s = _vp(sigma_prev[-1])
    alpha_t, std_t, lam_t = _vp(sigma_t)
    m0 = model_prev[-1]
    h = lam_t - lam_s
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_vp(sigma_prev[-(k + 1)])[2] - lam_s) / h
        rks.append(rk)
        d1s.append((model_prev[-(k + 1)] - m0) / rk)
    rks_t = torch.stack([*rks, torch.ones_like(h)])

    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append(rks_t ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b_t = torch.stack(rows), torch.stack(b)

    z_lin = (std_t / std_s) * z - (alpha_t * h_phi_1) * m0
    z_t = z_lin
    if d1s:
        rhos_p = torch.tensor([0.5], dtype=h.dtype) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b_t[:-1])
        z_t = z_lin - (alpha_t * b_h) * sum(r * d for r, d in zip(rhos_p, d1s))
    if not use_corrector:
        return z_t, None
    rhos_c = torch.tensor([0.5], dtype=h.dtype) if order == 1 else torch.linalg.solve(big_r, b_t)
    model_t = data_pred(z_t, sigma_t)
    corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0
    return z_lin - (alpha_t * b_h) * (corr + rhos_c[-1] * (model_t - m0)), model_t


@torch.no_grad()
def sample_uni_pc(denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                  callback: StepCallback | None = None, seed: int | None = None,
                  variant: str = "bh1") -> torch.Tensor:
    """UniPC multistep, order min(3, steps − 1), lower order on the first and final steps, the
    corrector on every step but the last, run on z = x/sqrt(1 + σ²). As in ComfyUI the final
    σ = 0 is replaced by 10⁻³ (the solver works in log-SNR), so the result keeps that trace of
    noise. With a single step ComfyUI returns the input unchanged; this takes a first-order step."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if len(sigmas) <= 1:
        return x
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    steps = len(ts) - 1
    order = min(3, steps - 1)
    ones = x.new_ones([x.shape[0]])

    def data_pred(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha, std, _ = _vp(sigma)
        x_ve = z * (sigma**2 + 1.0) ** 0.5
        eps = (x_ve - denoiser(x_ve, sigma * ones)) / sigma
        return (z - std * eps) / alpha

    def report(i: int, at: int, z: torch.Tensor, total: int) -> None:  # z is at σ = ts[at]
        _report(callback, i, z / _vp(ts[at])[0], ts[i], model_prev[-1], total)

    z = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    model_prev, sigma_prev = [data_pred(z, ts[0])], [ts[0]]
    if steps == 1:
        report(0, 0, z, 1)
        z = _unipc_update(data_pred, z, model_prev, sigma_prev, ts[1], 1, variant, False)[0]
        return z / _vp(ts[-1])[0]
    report(0, 0, z, steps)
    for i in range(1, steps):
        if i < order:
            z, model_z = _unipc_update(data_pred, z, model_prev, sigma_prev, ts[i], i, variant, True)
            model_prev.append(model_z)
            sigma_prev.append(ts[i])
        else:
            for step in range(i, steps + 1 if i == steps - 1 else i + 1):
                step_order = min(order, steps + 1 - step)
                z, model_z = _unipc_update(data_pred, z, model_prev, sigma_prev, ts[step], step_order, variant,
                                           use_corrector=step != steps)
                model_prev, sigma_prev = model_prev[1:] + [model_prev[-1]], sigma_prev[1:] + [ts[step]]
                if model_z is not None:
                    model_prev[-1] = model_z
        report(i, steps if i == steps - 1 and i >= order else i, z, steps)
    return z / _vp(ts[-1])[0]
