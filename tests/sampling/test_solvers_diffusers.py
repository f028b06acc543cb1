"""Samplers against diffusers' schedulers on a real-layout (shrunk SD1.5) checkpoint.

Both sides run the same weights (our UNet's state dict through diffusers' single-file
converter), the same CFG context (from our text encoder), the same initial noise and the
same σ levels; each side runs its own loop. What makes the pairs the same algorithm:

* Euler, Euler ancestral, Heun: diffusers' k-diffusion-style schedulers keep x in our VE form
  x = x0 + σ·ε and scale the UNet input by 1/sqrt(σ² + 1) (`scale_model_input`), as our
  Denoiser does. With "leading" spacing (SD's config, steps_offset = 1) their timesteps are
  integers, so their σ's are trained levels σ_t exactly and our Denoiser's nearest step is t.
  Heun's schedule repeats every inner σ (predictor, corrector); our sigmas drop the repeats.
  Euler ancestral: both draw N(0, I) from one CPU generator in the same order (diffusers also
  draws at the last step, where σ_up = 0, after ours has stopped), so one seed gives both the
  same noise.
* DPM++ 2M karras (dpmsolver++, order 2, final σ = 0): diffusers keeps the VP sample
  z = x/sqrt(σ² + 1) (init_noise_sigma = 1), so x_T = sqrt(σ_0² + 1)·noise on our side; its
  Karras σ's span the same [σ_min, σ_max] as our "karras" scheduler, its UNet timestep is the
  interpolated t rounded = our nearest step in log σ. Its first step is first order and the
  step to σ = 0 is first order (lower_order_final), like ours; the midpoint 2M update,
  (1 + 1/2r)·D_i − (1/2r)·D_i−1, is ours written in z.
* DDIM: z_t = sqrt(ᾱ_t)·x, so DDIM η = 0 is Euler in σ (Song et al. 2021, §4.3). SD's
  config has set_alpha_to_one = False: the last step lands on ᾱ_0, i.e. σ_0 = σ_min, not
  σ = 0, so our schedule ends at σ_min and the result is compared as z = x/sqrt(σ_min² + 1).
  η = 1 is checked too: diffusers' posterior std divided by sqrt(ᾱ_prev) is our σ_up.

Tolerance: max |ours − diffusers| ≤ 1e-4 · max |diffusers| over the final latent.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.loading.loader import load_checkpoint
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.pipeline.jobs import make_guider
from ldm_core.sampling.sampler_table import SAMPLERS
from ldm_core.sampling.schedule import get_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from bench.reference import unet_config  # noqa: E402

# diffusers' schedulers call np.array on tensors in a way numpy 2 deprecates (their code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOLERANCE = 1e-4  # max|ours − diffusers| / max|diffusers|
STEPS = 4
CFG = 5.0
LATENT = (1, 4, 16, 16)
NOISE_SEED, SAMPLER_SEED = 11, 12
# Stable Diffusion 1.5's scheduler_config.json (training schedule + inference spacing); each
# scheduler takes the keys it knows (from_config ignores the rest).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = shrink(PRESETS["sd1"])
    path = save_checkpoint(config, tmp_path_factory.mktemp("ckpt") / "tiny_sd1.safetensors", seed=3, vae=False)
    ckpt = load_checkpoint(path, device="cpu")
    cfg = unet_config(config.unet, sample_size=LATENT[-1])
    ref = UNet2DConditionModel(**cfg)
    sd = {"model.diffusion_model." + k: v for k, v in ckpt.model.unet.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg))
    ref.eval()
    positive, negative = ckpt.text_encoder.encode("a red cube on a table"), ckpt.text_encoder.encode("")
    guider = make_guider(ckpt.model, [positive], [negative], CFG, LATENT)
    context = torch.cat([negative.context, positive.context])  # diffusers' [uncond, cond] batch
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(NOISE_SEED))
    return ckpt.model, guider, ref, context, noise


@torch.no_grad()
def diffusers_loop(scheduler, unet, context: torch.Tensor, latents: torch.Tensor, seed: int, **step_kw) -> torch.Tensor:
    """diffusers' own txt2img denoising loop (as in StableDiffusionPipeline), ε-space CFG."""
    if "generator" in inspect.signature(scheduler.step).parameters:  # Heun, DPM-Solver(2M) draw nothing
        step_kw["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps_uncond, eps_cond = unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + CFG * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kw).prev_sample
    return latents


def ours(name: str, guider, x: torch.Tensor, sigmas: torch.Tensor, seed: int, **options) -> torch.Tensor:
    return SAMPLERS[name](guider, x.clone(), sigmas.float(), seed=seed, **options)


def assert_close(ours_out: torch.Tensor, ref_out: torch.Tensor, what: str) -> float:
    rel = ((ours_out - ref_out).abs().max() / ref_out.abs().max()).item()
    print(f"{what}: max|Δ|/max|ref| = {rel:.2e} (max|ref| = {ref_out.abs().max().item():.3f})")
    assert torch.isfinite(ref_out).all()
    assert rel <= TOLERANCE, f"{what}: ours vs diffusers differ by {rel:.2e} of the latent scale (> {TOLERANCE})"
    return rel


def trained_sigmas(model, timesteps: torch.Tensor) -> torch.Tensor:
    """Our schedule's σ at diffusers' integer timesteps, then 0."""
    return torch.cat([model.schedule.sigmas[timesteps.long()], torch.zeros(1)])


@pytest.mark.parametrize("name, scheduler_type", [
    ("euler", EulerDiscreteScheduler),
    ("euler_ancestral", EulerAncestralDiscreteScheduler),
    ("heun", HeunDiscreteScheduler),
])
def test_k_style_schedulers_match(setup, name, scheduler_type):
    model, guider, ref, context, noise = setup
    scheduler = scheduler_type.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    ref_sigmas = torch.unique_consecutive(scheduler.sigmas)  # Heun repeats the inner levels
    timesteps = torch.unique_consecutive(scheduler.timesteps)
    sigmas = trained_sigmas(model, timesteps)
    assert len(sigmas) == STEPS + 1
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=1e-5, atol=0)  # same σ levels, from our schedule
    x_T = noise * scheduler.init_noise_sigma  # sqrt(σ_0² + 1)·noise for "leading" spacing
    expected = diffusers_loop(scheduler, ref, context, x_T, SAMPLER_SEED)
    assert_close(ours(name, guider, x_T, sigmas, SAMPLER_SEED), expected, name)


def test_dpmpp_2m_karras_matches(setup):
    model, guider, ref, context, noise = setup
    scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True,
                                                        algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(STEPS)
    sigmas = get_sigmas(model.schedule, "karras", STEPS)  # our ComfyUI-named scheduler
    # Same Karras levels up to float32-vs-float64 arithmetic (measured 1.2e-5 relative at most).
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), rtol=5e-5, atol=0)
    # Its UNet timesteps (interpolated t, rounded) are our Denoiser's nearest trained steps.
    assert torch.equal(model.schedule.timestep(sigmas[:-1]).long(), scheduler.timesteps.long())
    expected = diffusers_loop(scheduler, ref, context, noise * scheduler.init_noise_sigma, SAMPLER_SEED)
    x_T = noise * (sigmas[0] ** 2 + 1).sqrt()  # diffusers' z = x/sqrt(σ² + 1), init_noise_sigma = 1
    assert_close(ours("dpmpp_2m", guider, x_T, sigmas, SAMPLER_SEED), expected, "dpmpp_2m karras")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches(setup, eta):
    model, guider, ref, context, noise = setup
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    # ᾱ after the last step is ᾱ_0 (set_alpha_to_one=False): the walk ends at σ_min, not 0.
    sigmas = torch.cat([model.schedule.sigmas[scheduler.timesteps.long()], model.schedule.sigma_min.reshape(1)])
    expected = diffusers_loop(scheduler, ref, context, noise * scheduler.init_noise_sigma, SAMPLER_SEED, eta=eta)
    x_T = noise * (sigmas[0] ** 2 + 1).sqrt()
    out = ours("ddim", guider, x_T, sigmas, SAMPLER_SEED, eta=eta) / (sigmas[-1] ** 2 + 1).sqrt()
    assert_close(out, expected, f"ddim eta={eta}")


def test_mismatched_noise_is_detected(setup):
    """The comparison can fail: another ancestral seed moves the result far beyond the tolerance."""
    model, guider, ref, context, noise = setup
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    sigmas = trained_sigmas(model, scheduler.timesteps)
    x_T = noise * scheduler.init_noise_sigma
    expected = diffusers_loop(scheduler, ref, context, x_T, SAMPLER_SEED)
    other = ours("euler_ancestral", guider, x_T, sigmas, SAMPLER_SEED + 1)
    assert ((other - expected).abs().max() / expected.abs().max()).item() > 100 * TOLERANCE
