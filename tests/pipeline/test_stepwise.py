"""The diffusion process as parts: a graph of ForwardDiffusion → (Denoise → SamplerStep)×N reproduces
the KSampler bit for bit; known answers for q(x_t | x_0), one evaluation, one step, the schedule plot."""
from __future__ import annotations

import math

import pytest
import torch

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.graph import Executor
from ldm_core.networks.config import ScheduleConfig
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.pipeline import stepwise as parts
from ldm_core.sampling.sampler_table import SAMPLERS
from ldm_core.sampling.schedule import DiscreteSchedule, get_sigmas
from ldm_nodes.context import NodeContext
from ldm_nodes.registry import headless_registry

SD = DiscreteSchedule(ScheduleConfig())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    save_checkpoint(shrink(PRESETS["sd1"]), root / "checkpoints" / "tiny.safetensors", seed=2)
    return root


@pytest.fixture(scope="module")
def executor():
    return Executor(headless_registry())  # one cache: the checkpoint loads once


def _graph(sampler: str, sigmas: list[float], denoise: float, seed: int = 11, steps: int = 3, cfg: float = 4.0) -> dict:
    g = {
        "1": {"class_type": "LDMCheckpointLoader", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "LDMTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}},
        "3": {"class_type": "LDMTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LDMEmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {"class_type": "LDMKSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": denoise}},
        "10": {"class_type": "LDMForwardDiffusion", "inputs": {
            "model": ["1", 0], "latent": ["4", 0], "seed": seed, "level": sigmas[0], "level_type": "sigma"}},
    }
    x = ["10", 0]
    for i in range(len(sigmas) - 1):
        d, s = str(20 + 2 * i), str(21 + 2 * i)
        g[d] = {"class_type": "LDMDenoise", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": cfg, "latent": x, "sigma": sigmas[i]}}
        g[s] = {"class_type": "LDMSamplerStep", "inputs": {
            "model": ["1", 0], "latent": x, "denoised": [d, 1], "sampler_name": sampler,
            "sigma": sigmas[i], "sigma_next": sigmas[i + 1]}}
        x = [s, 0]
    return g, x[0]


@pytest.mark.parametrize("sampler,denoise", [("euler", 1.0), ("euler", 0.6), ("ddim", 1.0)])
def test_parts_graph_reproduces_ksampler_exactly(models, executor, sampler, denoise):
    if sampler not in SAMPLERS:
        pytest.skip(f"{sampler} not registered yet")
    ctx = NodeContext.headless(models)
    schedule = DiscreteSchedule(shrink(PRESETS["sd1"]).schedule)
    sigmas = [float(s) for s in get_sigmas(schedule, "normal", 3, denoise)]
    graph, last = _graph(sampler, sigmas, denoise)
    result = executor.run(graph, ctx, outputs=["5", last])
    ksampled = result.outputs["5"][0]["samples"]
    chained = result.outputs[last][0]["samples"]
    assert ksampled.shape == (1, 4, 6, 8)
    assert torch.equal(chained, ksampled), (chained - ksampled).abs().max().item()
    assert result.outputs["10"][1] == sigmas[0]


def test_forward_diffusion_closed_form():
    z0 = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    t = 400
    sigma = float(SD.sigmas[t])
    x = parts.forward_diffuse(SD, z0, sigma, eps)
    assert torch.allclose(x, z0 + sigma * eps, atol=1e-6)
    abar = float(SD.alphas_cumprod()[t])
    z_t = math.sqrt(abar) * z0 + math.sqrt(1 - abar) * eps  # the paper's q(z_t | z_0)
    assert torch.allclose(parts.vp_from_sigma_space(x, sigma), z_t, atol=1e-5)
    assert parts.level_to_sigma(SD, t, "timestep") == pytest.approx(sigma, rel=1e-6)
    top = float(SD.sigma_max)  # KSampler's pure-noise start: unit variance after c_in
    assert torch.allclose(parts.forward_diffuse(SD, z0, top, eps), z0 + math.sqrt(1 + top**2) * eps, atol=1e-4)
    with pytest.raises(parts.PartsError, match="timestep must be in 0..999"):
        parts.level_to_sigma(SD, 1000, "timestep")


def test_denoise_and_step_known_answers():
    """Gaussian data N(0, s²) has the exact denoiser D(x, σ) = x·s²/(s² + σ²)."""
    s2 = 0.64
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2)) * 5

    def exact(v, sigma):
        return v * s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    eps, x0 = parts.denoise(exact, x, 4.0)
    assert torch.allclose(x0, x * s2 / (s2 + 16))
    assert torch.allclose(x0 + 4.0 * eps, x, atol=1e-6)
    step = parts.sampler_step("euler", x, x0, 4.0, 1.5)
    assert torch.allclose(step, x + (x - x0) / 4.0 * (1.5 - 4.0), atol=1e-6)
    assert torch.allclose(parts.sampler_step("euler", x, x0, 4.0, 0.0), x0, atol=1e-6)  # to σ = 0: x̂0
    with pytest.raises(parts.PartsError, match="sigma must be > 0"):
        parts.denoise(exact, x, 0.0)
    with pytest.raises(parts.PartsError, match="one step at a time"):
        parts.sampler_step("dpmpp_2m", x, x0, 4.0, 1.0)


def test_model_space_copy_is_used_only_while_samples_are_unchanged(models):
    from ldm_core.imaging.latent import with_samples
    from ldm_core.loading.loader import load_checkpoint

    model = load_checkpoint(models / "checkpoints" / "tiny.safetensors").model
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    lat = parts.from_model_space(model, x)
    assert parts.to_model_space(model, lat) is x
    assert torch.equal(dict(lat)["samples"], model.latent_out(x))
    changed = with_samples(lat, lat["samples"] * 2)
    assert torch.equal(parts.to_model_space(model, changed), model.latent_in(lat["samples"] * 2))


def test_schedule_plot_draws_the_values():
    values = parts.schedule_values(SD, "normal", 6, "sigma")
    assert torch.equal(values, get_sigmas(SD, "normal", 6).double())
    img = parts.render_plot(values.tolist(), 256, 160)
    assert img.shape == (1, 160, 256, 3) and img.dtype == torch.float32
    pts = parts.plot_points(values.tolist(), 256, 160)
    curve = torch.tensor(parts.CURVE) / 255
    for px, py in pts:
        assert torch.allclose(img[0, py, px], curve, atol=1e-6)
    assert pts[0][1] < pts[-1][1]  # σ falls: first point at the top
    abar = parts.schedule_values(SD, "normal", 6, "alphas_cumprod")
    assert abar[-1] == 1.0 and parts.plot_points(abar.tolist(), 256, 160)[0][1] > pts[0][1]
    assert torch.allclose(abar, 1 / (1 + values**2))
    with pytest.raises(parts.PartsError, match="too small"):
        parts.render_plot([1.0, 0.0], 40, 40)


def test_schedule_plot_node_and_parts_refuse_a_noise_mask(models, executor):
    ctx = NodeContext.headless(models)
    graph = {
        "1": {"class_type": "LDMCheckpointLoader", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "4": {"class_type": "LDMEmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
        "5": {"class_type": "LDMSchedulePlot", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                           "denoise": 1.0, "quantity": "sigma", "width": 200,
                                                           "height": 120}},
    }
    result = executor.run(graph, ctx, outputs=["5"])
    assert result.outputs["5"][0].shape == (1, 120, 200, 3)
    from ldm_nodes.stepwise_nodes import forward_diffusion

    with pytest.raises(ValueError, match="noise mask"):
        forward_diffusion(ctx, None, {"samples": torch.zeros(1, 4, 2, 2), "noise_mask": torch.ones(1, 2, 2)},
                          0, 1.0, "sigma")
