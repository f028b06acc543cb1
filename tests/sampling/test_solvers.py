"""Samplers: parity with ComfyUI v0.3.64 on a toy denoiser, with diffusers for DDIM/PLMS, the exact
probability-flow ODE solution for Gaussian data (order of convergence), sample statistics of the
stochastic samplers, seeded reproducibility and the callback protocol.

Fixture: tests/data/samplers_comfyui.safetensors, recorded by tests/tools/record_sampler_refs.py
from ComfyUI's own k-diffusion functions and UniPC on the toy denoiser restated below.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_core.sampling.sampler_table import SAMPLERS
from ldm_core.sampling.solvers import BrownianNoise, plms_order, sample_ddim, sample_euler, sample_euler_ancestral

REF = load_file(str(Path(__file__).parents[1] / "data" / "samplers_comfyui.safetensors"))
SEED = 1234  # the seed the fixture's stochastic runs used
MU, S, K = REF["mu"], REF["s"], float(REF["nonlin"])
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "ddpm", "lcm")
DETERMINISTIC = tuple(n for n in SAMPLERS if n not in STOCHASTIC)


class Toy:
    """D(x, σ) = μ + s²/(s² + σ²)·(x − μ) + k·σ/(1 + σ²)·tanh(x), per channel (as recorded); counts calls."""

    def __init__(self, mu=MU, s=S, k=K):
        self.mu, self.s, self.k, self.calls = mu, s, k, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        mu, s = self.mu.to(x.dtype), self.s.to(x.dtype)
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return mu + s**2 / (s**2 + s2) * (x - mu) + self.k * sigma.reshape(-1, 1, 1, 1) / (1 + s2) * torch.tanh(x)


def _seeded(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sampler_names_in_comfyui_order():
    assert list(SAMPLERS) == ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
                              "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm",
                              "lcm", "ddim", "plms", "uni_pc", "uni_pc_bh2"]


# Measured on the CPU the references were made on: 0 for all but lms (4.8e-7), dpmpp_sde (4.8e-7), uni_pc
# (2.4e-6), uni_pc_bh2 (8.3e-7). On an Intel Xeon with AVX-512, where torch's vectorised exp/log round the
# last bit differently, dpm_2_ancestral and dpmpp_3m_sde differ by 3.6e-6; hence 5e-6 by default.
TOLERANCE = {"uni_pc": 1e-5, "uni_pc_bh2": 1e-5}


@pytest.mark.parametrize("schedule", ["normal8", "karras12", "partial5"])
@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "plms"])
def test_matches_comfyui(name, schedule):
    toy = Toy()
    x, sigmas = REF[f"x/{schedule}"], REF[f"sigmas/{schedule}"]
    out = SAMPLERS[name](toy, x.clone(), sigmas.clone(), seed=SEED)
    want = REF[f"out/{schedule}/{name}"]
    err = float((out - want).abs().max())
    assert err <= TOLERANCE.get(name, 5e-6), err
    assert toy.calls == int(REF[f"calls/{schedule}/{name}"])  # same number of model evaluations


def test_ddim_eta0_is_euler_and_eta1_is_euler_ancestral():
    x, sigmas = REF["x/normal8"], REF["sigmas/normal8"]
    assert torch.equal(sample_ddim(Toy(), x, sigmas), sample_euler(Toy(), x, sigmas))
    a = sample_ddim(Toy(), x, sigmas, eta=1.0, seed=5)
    b = sample_euler_ancestral(Toy(), x, sigmas, seed=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---- DDIM (η > 0) and PLMS against diffusers' discrete-time schedulers --------------------------

def _diffusers_run(scheduler, steps: int, seed: int, step_kw: dict):
    """Run a diffusers scheduler on the toy denoiser turned into an ε model; return our sigmas, the
    start x (variance-exploding form) and diffusers' result in the same form."""
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    sigma_of = lambda t: ((1 - abar[t]) / abar[t]).sqrt()  # noqa: E731
    toy = Toy()

    def eps_model(sample, t):
        sigma = sigma_of(t).float().reshape(1)
        x = sample / abar[t].sqrt().float()
        return (x - toy(x, sigma.expand(x.shape[0]))) / sigma

    ts = [int(t) for t in scheduler.timesteps]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    sample = x0 * abar[ts[0]].sqrt().float() * float(sigma_of(ts[0]))  # z_T for x_T = σ_T·noise
    x_start = sample / abar[ts[0]].sqrt().float()
    gen = torch.Generator().manual_seed(seed)
    for t in ts:
        sample = scheduler.step(eps_model(sample, t), t, sample, **step_kw, **({"generator": gen} if step_kw else {}))[0]
    unique = list(dict.fromkeys(ts))
    sigmas = torch.tensor([float(sigma_of(t)) for t in unique] + [float(sigma_of(0))])
    return sigmas, x_start, sample / abar[0].sqrt().float()


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                steps_offset=1)


def test_plms_matches_diffusers_pndm():
    from diffusers import PNDMScheduler

    sigmas, x, want = _diffusers_run(PNDMScheduler(skip_prk_steps=True, **SD_BETAS), 10, 0, {})
    out = SAMPLERS["plms"](Toy(), x, sigmas, stable_order=False)  # the paper's fixed order
    err = float((out - want).abs().max())
    assert err < 2e-5, err  # measured 1.2e-6 (diffusers steps z in the variance-preserving form)


def test_plms_order_stays_inside_adams_bashforth_stability():
    # r = 1 − σ_next/σ against the stability bounds 3/10, 6/11, 1, 2 of orders 4, 3, 2, 1
    assert plms_order(10.0, 8.0, 4) == 4          # r = 0.2
    assert plms_order(10.0, 8.0, 2) == 2          # never more slopes than are known
    assert plms_order(0.346, 0.228, 4) == 3       # r = 0.34: the 20-step ddim_uniform grid's third-last step
    assert plms_order(0.228, 0.041, 4) == 2       # r = 0.82: its second-last
    assert plms_order(0.041, 0.0, 4) == 1         # r = 1, on AB2's boundary: first order, x = x̂0
    assert plms_order(1.0, 0.5, 4) == 3           # r = 0.5 < 6/11
    assert plms_order(1.0, 0.4, 4) == 2           # r = 0.6 > 6/11


def test_plms_stable_order_changes_only_the_coarse_final_steps():
    from ldm_core.sampling.schedule import DiscreteSchedule, ScheduleConfig, get_sigmas

    g = _seeded(5)
    x = torch.randn(2, 3, 4, 4, generator=g)
    sigmas = get_sigmas(DiscreteSchedule(ScheduleConfig()), "ddim_uniform", 20)  # SD's scaled-linear betas
    x = x * sigmas[0]
    steps = []
    SAMPLERS["plms"](Toy(), x, sigmas, callback=lambda info: steps.append(info["x"]))
    paper = []
    SAMPLERS["plms"](Toy(), x, sigmas, stable_order=False, callback=lambda info: paper.append(info["x"]))
    r = 1 - sigmas[1:-1] / sigmas[:-2]  # relative fall of every step but the last
    lowered = int((r >= 0.3).nonzero()[0])  # the first step that loses its 4th order
    assert lowered == len(steps) - 3  # of 20 steps, only the last three change
    assert all(torch.equal(a, b) for a, b in zip(steps[:lowered + 1], paper[:lowered + 1]))
    assert not torch.equal(steps[lowered + 1], paper[lowered + 1])
    # the last step is first order: the output is the denoiser's estimate at the last σ > 0
    denoised = Toy()(steps[-1], sigmas[-2].expand(2))
    out = SAMPLERS["plms"](Toy(), x, sigmas)
    assert torch.allclose(out, denoised, atol=1e-6)


def test_ddim_with_eta_matches_diffusers_ddim_noise_included():
    from diffusers import DDIMScheduler

    sigmas, x, want = _diffusers_run(DDIMScheduler(clip_sample=False, **SD_BETAS), 8, 11, {"eta": 0.5})
    out = sample_ddim(Toy(), x, sigmas, eta=0.5, seed=11)  # same CPU noise stream as diffusers
    err = float((out - want).abs().max())
    assert err < 2e-5, err  # measured 5.4e-7


# ---- known answer: Gaussian data, exact probability-flow ODE ------------------------------------

def _ode_schedule(n: int, smin: float = 0.05, smax: float = 10.0) -> torch.Tensor:
    """Karras spacing, ending at σ_min (no final jump to 0, so every sampler integrates the ODE)."""
    ramp = torch.arange(n + 1, dtype=torch.float64) / n
    return (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7


def _ode_error(name: str, n: int) -> float:
    mu, s = MU.double(), S.double()
    sigmas = _ode_schedule(n)
    x_t = mu + torch.randn(3, 3, 2, 2, generator=_seeded(0), dtype=torch.float64) * float(sigmas[0])
    exact = mu + (x_t - mu) * (s**2 + sigmas[-1] ** 2).sqrt() / (s**2 + sigmas[0] ** 2).sqrt()
    out = SAMPLERS[name](Toy(mu, s, 0.0), x_t, sigmas)
    return float((out - exact).abs().max())


# Observed order (log2 of the error ratio per step doubling, 32→64→128 steps). Measured here:
# euler/ddim 0.99, heun 2.01, dpm_2 2.01, dpmpp_2m 2.03, lms 3.2–3.5, plms 2.0 (fixed Adams–Bashforth
# weights on an uneven grid), uni_pc 2.0–2.1 (ComfyUI's UniPC takes its last step at first order
# without the corrector, which caps the global order at 2).
ORDERS = {"euler": (0.85, 1.2), "ddim": (0.85, 1.2), "heun": (1.8, 2.3), "dpm_2": (1.8, 2.3),
          "dpmpp_2m": (1.8, 2.3), "lms": (2.8, 4.2), "plms": (1.8, 2.4), "uni_pc": (1.8, 2.5),
          "uni_pc_bh2": (1.8, 2.5)}


def test_the_sampler_table_states_what_these_tests_measure():
    """Each entry's traits: noise drawn exactly by the samplers the statistics tests treat as
    stochastic; a stated order no lower than the order measured below; one-step form only for
    the two solvers without state between steps."""
    assert {n for n, e in SAMPLERS.items() if e.stochastic} == set(STOCHASTIC)
    for name, (lo, _) in ORDERS.items():
        assert SAMPLERS[name].order >= lo, name
    assert [n for n, e in SAMPLERS.items() if e.one_step] == ["euler", "ddim"]
    assert [n for n, e in SAMPLERS.items() if e.inpaint_noise != "start"] == ["ddim"]


@pytest.mark.parametrize("name", list(ORDERS))
def test_deterministic_samplers_converge_to_exact_ode_solution_at_their_order(name):
    errors = [_ode_error(name, n) for n in (32, 64, 128)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    lo, hi = ORDERS[name]
    assert errors[-1] < 2e-2, errors
    assert all(lo < o < hi for o in orders), (errors, orders)


# ---- stochastic samplers: right distribution, seeded ---------------------------------------------

STAT_CASES = [*STOCHASTIC, "ddim_eta1"]
FIRST_ORDER_ANCESTRAL = ("euler_ancestral", "ddpm", "ddim_eta1")  # one and the same step (DDPM posterior)


def _expected_std(name: str, sigmas: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Output std for Gaussian data N(μ, s²) and the exact denoiser. Converged samplers: s. For the
    first-order ancestral step x' = μ + a·(x − μ) + σ_up·z, a = (s² + σ_down·σ)/(s² + σ²), and for LCM's
    x' = D(x) + σ_next·z, the variance recursion is exact at any step count (they only reach s² as
    steps → ∞; LCM never does, its D is a posterior mean, not a sample), so the test pins that."""
    if name not in (*FIRST_ORDER_ANCESTRAL, "lcm"):
        return s.flatten()
    s2 = s.double().flatten() ** 2
    var = s2 + float(sigmas[0]) ** 2
    for sigma, nxt in zip(sigmas[:-1].double().tolist(), sigmas[1:].double().tolist()):
        if name == "lcm":
            var = (s2 / (s2 + sigma**2)) ** 2 * var + nxt**2
            continue
        up = min(nxt, (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5)
        down = (nxt**2 - up**2) ** 0.5
        var = ((s2 + down * sigma) / (s2 + sigma**2)) ** 2 * var + up**2
    return var.sqrt().float()


@pytest.mark.parametrize("name", STAT_CASES)
def test_stochastic_samplers_end_in_the_data_distribution(name):
    # Exact denoiser of N(μ, s²) data; start from the exact marginal at σ_max; 2000 draws per channel.
    mu, s = MU, S
    sigmas = torch.cat([_ode_schedule(40, 0.03, 14.6).float(), torch.zeros(1)])
    x_t = mu + torch.randn(500, 3, 2, 2, generator=_seeded(9)) * (s**2 + sigmas[0] ** 2).sqrt()
    sampler = partial(sample_ddim, eta=1.0) if name == "ddim_eta1" else SAMPLERS[name]
    out = sampler(Toy(mu, s, 0.0), x_t, sigmas, seed=10)
    mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
    # standard error: mean ≈ 0.022·s, std ≈ 1.6 %; second-order samplers at 40 steps are within ~2 % of s
    torch.testing.assert_close(mean, mu.flatten(), atol=0.07, rtol=0)
    torch.testing.assert_close(std, _expected_std(name, sigmas, s), rtol=0.06, atol=0)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_result_other_seed_other_result(name):
    x, sigmas = REF["x/karras12"], REF["sigmas/karras12"]
    a = SAMPLERS[name](Toy(), x, sigmas, seed=1)
    b = SAMPLERS[name](Toy(), x, sigmas, seed=1)
    c = SAMPLERS[name](Toy(), x, sigmas, seed=2)
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-2


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_ignore_the_seed(name):
    x, sigmas = REF["x/karras12"], REF["sigmas/karras12"]
    assert torch.equal(SAMPLERS[name](Toy(), x, sigmas, seed=1),
                       SAMPLERS[name](Toy(), x, sigmas, seed=2))


def test_ancestral_noise_is_the_seeded_cpu_stream():
    # One Euler-ancestral step from σ to 0 < σ_next: x_next = x + d·(σ_down − σ) + σ_up·z with z the
    # first randn of a CPU generator seeded with the seed (ComfyUI's default_noise_sampler on CPU).
    x = torch.randn(1, 3, 2, 2, generator=_seeded(4))
    sigmas = torch.tensor([2.0, 1.0])
    out = sample_euler_ancestral(Toy(), x, sigmas, seed=77)
    sigma_up = math.sqrt(1.0 * (4.0 - 1.0) / 4.0)
    sigma_down = math.sqrt(1.0 - sigma_up**2)
    d = (x - Toy()(x, torch.tensor([2.0]))) / 2.0
    z = torch.randn(x.shape, generator=_seeded(77))
    torch.testing.assert_close(out, x + d * (sigma_down - 2.0) + z * sigma_up, atol=1e-6, rtol=0)


def test_brownian_increments_are_consistent_and_unit_variance():
    x = torch.zeros(4000, 1, 1, 1)
    sigmas = torch.tensor([8.0, 2.0, 0.5, 0.0])
    w = BrownianNoise(x, sigmas, seed=5)
    whole = w(sigmas[0], sigmas[2]) * math.sqrt(7.5)
    parts = w(sigmas[0], sigmas[1]) * math.sqrt(6.0) + w(sigmas[1], sigmas[2]) * math.sqrt(1.5)
    torch.testing.assert_close(whole, parts, atol=1e-4, rtol=0)  # one path: increments add up
    z = w(sigmas[0], sigmas[1])
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 1) < 0.05
    assert torch.equal(z, BrownianNoise(x, sigmas, seed=5)(sigmas[0], sigmas[1]))  # seeded


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_reports_every_step(name):
    seen = []
    x, sigmas = REF["x/normal8"], REF["sigmas/normal8"]
    SAMPLERS[name](Toy(), x, sigmas, callback=seen.append, seed=SEED)
    assert [c["i"] for c in seen] == list(range(len(sigmas) - 1))
    for c in seen:
        assert set(c) == {"i", "x", "sigma", "denoised", "total"} and c["total"] == len(sigmas) - 1
        assert c["denoised"].shape == x.shape and c["x"].shape == x.shape


def test_bad_options_name_what_to_use():
    x, sigmas = REF["x/normal8"], REF["sigmas/normal8"]
    with pytest.raises(ValueError, match="solver_type"):
        SAMPLERS["dpmpp_2m_sde"](Toy(), x, sigmas, solver_type="rk4")
    with pytest.raises(ValueError, match="variant"):
        SAMPLERS["uni_pc"](Toy(), x, sigmas, variant="bh3")


def test_short_schedules():
    x = REF["x/normal8"]
    for name, sampler in SAMPLERS.items():
        assert torch.equal(sampler(Toy(), x, torch.tensor([3.0])), x), name  # nothing to do
        one = sampler(Toy(), x, torch.tensor([3.0, 0.0]), seed=SEED)
        assert torch.isfinite(one).all() and float((one - x).abs().max()) > 0.1, name  # one step denoises


def test_sampler_choice_carries_options_and_is_hashable():
    from ldm_core.sampling.sampler_table import SamplerChoice, select_sampler

    choice = select_sampler("euler_ancestral", eta=0.0)
    assert choice == SamplerChoice("euler_ancestral", (("eta", 0.0),)) and hash(choice) == hash(select_sampler(
        "euler_ancestral", eta=0.0))
    x, sigmas = REF["x/normal8"], REF["sigmas/normal8"]
    torch.testing.assert_close(choice(Toy(), x, sigmas, seed=SEED), sample_euler(Toy(), x, sigmas),
                               atol=1e-5, rtol=0)  # η = 0: no noise, the Euler ODE step
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'; available: euler"):
        select_sampler("dpm_fast")
