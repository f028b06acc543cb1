"""Noise schedule, σ↔t, the normal step schedule, initial noise, Euler, and guidance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_core.conditioning.cond import Cond
from ldm_core.networks.config import ScheduleConfig
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.networks.unet import UNetModel
from ldm_core.sampling.denoiser import Denoiser
from ldm_core.sampling.guidance import CFGGuider
from ldm_core.sampling.noise import noise_latent, prepare_noise
from ldm_core.sampling.schedule import DiscreteSchedule, get_sigmas, normal_sigmas
from ldm_core.sampling.solvers import sample_euler

SD = DiscreteSchedule(ScheduleConfig())


def test_sd_schedule_known_values():
    # Stable Diffusion's scaled-linear schedule: σ_min, σ_max as quoted by k-diffusion and ComfyUI.
    assert float(SD.sigma_min) == pytest.approx(0.0292, abs=1e-4)
    assert float(SD.sigma_max) == pytest.approx(14.6146, abs=1e-4)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(SD.alphas_cumprod().numpy(), abar, rtol=1e-6)


def test_sigma_timestep_round_trip_and_interpolation():
    t = torch.arange(0, 1000, 37).float()
    assert torch.equal(SD.timestep(SD.sigma(t)), t)
    mid = SD.sigma(torch.tensor(10.5))
    assert float(mid) == pytest.approx(math.sqrt(float(SD.sigmas[10]) * float(SD.sigmas[11])), rel=1e-5)
    # quantisation: a σ between two trained steps maps to the nearer one in log σ
    assert float(SD.timestep(SD.sigma(torch.tensor(10.4)))) == 10.0


def test_normal_schedule_matches_a_plain_restatement():
    steps = 20
    ours = normal_sigmas(SD, steps).numpy()
    log_s = np.log(SD.sigmas.double().numpy())
    ts = np.linspace(999, 0, steps)
    ref = np.exp(np.interp(ts, np.arange(1000), log_s))
    np.testing.assert_allclose(ours[:-1], ref, rtol=1e-5)
    assert ours[-1] == 0 and len(ours) == steps + 1
    assert ours[0] == pytest.approx(14.6146, abs=1e-4)


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    full = get_sigmas(SD, "normal", 25)
    part = get_sigmas(SD, "normal", 10, denoise=0.4)
    assert torch.equal(part, full[-11:])
    assert len(get_sigmas(SD, "normal", 10, denoise=0.0)) == 0


def test_prepare_noise_is_comfyui_convention():
    shape = (3, 4, 8, 6)
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(prepare_noise(shape, 42), ref)
    # batch_index: image k of a batch equals image k drawn in sequence from the same seed
    g = torch.Generator().manual_seed(7)
    singles = [torch.randn((1, 4, 8, 6), generator=g) for _ in range(4)]
    out = prepare_noise((2, 4, 8, 6), 7, batch_index=[3, 1])
    assert torch.equal(out[0:1], singles[3]) and torch.equal(out[1:2], singles[1])


def test_noise_latent_full_and_partial():
    noise = torch.ones(1, 1, 2, 2)
    latent = torch.full((1, 1, 2, 2), 0.5)
    s = get_sigmas(SD, "normal", 5)
    assert torch.allclose(noise_latent(SD, s, noise, latent), noise * math.sqrt(1 + float(s[0]) ** 2) + latent)
    s2 = get_sigmas(SD, "normal", 5, denoise=0.5)
    assert torch.allclose(noise_latent(SD, s2, noise, latent), noise * float(s2[0]) + latent)


def _gaussian_denoiser(s: float):
    # data ~ N(0, s²): the exact denoiser E[x0 | x] = x·s²/(s² + σ²)
    return lambda x, sigma: x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


def _karras(n: int, smin: float = 0.0292, smax: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def test_euler_converges_to_exact_ode_solution_at_first_order():
    s, smax = 0.5, 14.6
    x_t = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * smax
    exact = x_t * s / math.sqrt(s**2 + smax**2)  # probability-flow ODE solution at σ = 0
    errors = [float((sample_euler(_gaussian_denoiser(s), x_t, _karras(n)) - exact).abs().max())
              for n in (20, 40, 80, 160)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert errors[-1] < 2e-2
    assert all(0.8 < o < 1.3 for o in orders), orders


@pytest.fixture(scope="module")
def tiny_sd1():
    torch.manual_seed(0)
    cfg = shrink(PRESETS["sd1"])
    unet = UNetModel(cfg.unet).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    return cfg, Denoiser(unet, DiscreteSchedule(cfg.schedule), "eps", torch.float32)


def test_cfg_batched_equals_separate_calls_and_token_tiling(tiny_sd1):
    cfg, den = tiny_sd1
    g = torch.Generator().manual_seed(1)
    pos = Cond(torch.randn(1, 154, cfg.unet.context_dim, generator=g))  # two chunks
    neg = Cond(torch.randn(1, 77, cfg.unet.context_dim, generator=g))
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.full((2,), 3.0)
    guided = CFGGuider(den, cfg, [pos], [neg], 5.0, (64, 64))(x, sigma)
    d_pos = den(x, sigma, pos.context.expand(2, -1, -1))
    d_neg = den(x, sigma, neg.context.expand(2, -1, -1))  # 77 tokens, untiled
    torch.testing.assert_close(guided, d_neg + 5.0 * (d_pos - d_neg), atol=2e-5, rtol=1e-5)


def test_cfg_scale_one_skips_negative_and_entries_average(tiny_sd1):
    cfg, den = tiny_sd1
    g = torch.Generator().manual_seed(2)
    a, b = (Cond(torch.randn(1, 77, cfg.unet.context_dim, generator=g)) for _ in range(2))
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.full((1,), 1.0)
    guider = CFGGuider(den, cfg, [a], [], 1.0, (64, 64))
    assert guider.n_sides == 1
    torch.testing.assert_close(guider(x, sigma), den(x, sigma, a.context))
    both = CFGGuider(den, cfg, [a, b], [], 1.0, (64, 64))(x, sigma)
    torch.testing.assert_close(both, (den(x, sigma, a.context) + den(x, sigma, b.context)) / 2, atol=1e-5, rtol=1e-5)


def test_v_prediction_denoiser_formula(tiny_sd1):
    cfg, den = tiny_sd1
    v_den = Denoiser(den.unet, den.schedule, "v", torch.float32)
    x = torch.randn(1, 4, 8, 8)
    sigma = torch.tensor([2.0])
    ctx = torch.randn(1, 77, cfg.unet.context_dim)
    t = den.schedule.timestep(sigma)
    out = den.unet(x / math.sqrt(5), t, ctx)
    torch.testing.assert_close(v_den(x, sigma, ctx), x / 5 - out * 2 / math.sqrt(5))
    torch.testing.assert_close(den(x, sigma, ctx), x - out * 2)


def test_normal_schedule_pinned_to_comfyui():
    # Read off a real ComfyUI v0.3.64 run on CPU (KSampler, SD1.5 checkpoint, 4 steps, "normal").
    comfy = [14.614640235900879, 2.918307065963745, 0.9323579668998718, 0.029167160391807556, 0.0]
    assert normal_sigmas(SD, 4).tolist() == comfy


# ---- custom-sampling nodes (KSamplerSelect, BasicScheduler, SplitSigmas, SamplerCustom, …) -------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ldm_core.checkpoints.synthetic import save_checkpoint
    from ldm_core.loading.loader import load_checkpoint

    path = save_checkpoint(shrink(PRESETS["sd1"]), tmp_path_factory.mktemp("ck") / "m.safetensors", seed=3, vae=False)
    model = load_checkpoint(path, device="cpu").model
    g = torch.Generator().manual_seed(5)
    pos = Cond(torch.randn(1, 77, model.config.unet.context_dim, generator=g))
    neg = Cond(torch.randn(1, 77, model.config.unet.context_dim, generator=g))
    return model, [pos], [neg]


def _core(node_id):
    from ldm_nodes.registry import headless_registry

    return headless_registry()[node_id].run


def test_sampler_custom_equals_ksampler(tiny_model):
    from ldm_core.pipeline.jobs import ksample

    model, pos, neg = tiny_model
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (sampler,) = _core("KSamplerSelect")(None, sampler_name="heun")
    (sigmas,) = _core("BasicScheduler")(None, model=model, scheduler="karras", steps=3, denoise=1.0)
    out, denoised = _core("SamplerCustom")(None, model=model, add_noise=True, noise_seed=9, cfg=4.0, positive=pos,
                                           negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)
    ref = ksample(model, pos, neg, latent["samples"], seed=9, steps=3, cfg=4.0, sampler="heun", scheduler="karras")
    torch.testing.assert_close(out["samples"], ref, atol=1e-5, rtol=1e-5)
    # denoised_output is the last x̂0; Heun's final step to σ = 0 is an Euler step, which lands on it
    torch.testing.assert_close(denoised["samples"], out["samples"], atol=1e-4, rtol=1e-5)


def test_split_sigmas_two_passes_equal_one(tiny_model):
    model, pos, neg = tiny_model
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (sampler,) = _core("KSamplerSelect")(None, sampler_name="euler")
    (sigmas,) = _core("BasicScheduler")(None, model=model, scheduler="normal", steps=4, denoise=1.0)
    high, low = _core("SplitSigmas")(None, sigmas=sigmas, step=2)
    run = _core("SamplerCustom")
    kw = dict(model=model, noise_seed=1, cfg=3.0, positive=pos, negative=neg, sampler=sampler)
    whole, _ = run(None, add_noise=True, sigmas=sigmas, latent_image=latent, **kw)
    first, _ = run(None, add_noise=True, sigmas=high, latent_image=latent, **kw)
    second, _ = run(None, add_noise=False, sigmas=low, latent_image=first, **kw)
    torch.testing.assert_close(second["samples"], whole["samples"], atol=1e-5, rtol=1e-5)


def test_sigma_nodes_and_seeded_stochastic_sampler(tiny_model):
    model, pos, neg = tiny_model
    (k,) = _core("KarrasScheduler")(None, steps=5, sigma_max=14.614642, sigma_min=0.0291675, rho=7.0)
    torch.testing.assert_close(k, get_sigmas(model.schedule, "karras", 5), rtol=5e-5, atol=0)  # SD σ range
    (e,) = _core("ExponentialScheduler")(None, steps=5, sigma_max=10.0, sigma_min=0.1)
    assert e[0] == pytest.approx(10.0) and e[-1] == 0
    (f,) = _core("FlipSigmas")(None, sigmas=k)
    assert f[0] == pytest.approx(1e-4) and f[-1] == k[0]
    hi, lo = _core("SplitSigmasDenoise")(None, sigmas=k, denoise=0.4)
    assert len(hi) == 4 and torch.equal(lo, k[-3:])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (sampler,) = _core("KSamplerSelect")(None, sampler_name="dpmpp_2m_sde")
    kw = dict(model=model, add_noise=True, cfg=3.0, positive=pos, negative=neg, sampler=sampler, sigmas=k,
              latent_image=latent)
    a = _core("SamplerCustom")(None, noise_seed=4, **kw)[0]["samples"]
    b = _core("SamplerCustom")(None, noise_seed=4, **kw)[0]["samples"]
    c = _core("SamplerCustom")(None, noise_seed=5, **kw)[0]["samples"]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        _core("KSamplerSelect")(None, sampler_name="nope")
