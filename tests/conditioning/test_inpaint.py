"""Inpainting and masks: parity with ComfyUI 0.3.64 (recorded by tests/tools/record_inpaint_refs.py),
known answers for the noise mask, the inpaint model's input, compositing and img2img."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.conditioning import inpaint
from ldm_core.conditioning.cond import Cond
from ldm_core.graph import Executor
from ldm_core.imaging import mask as masks
from ldm_core.imaging.image_io import load_image, to_pil
from ldm_core.loading.loader import load_checkpoint
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.pipeline import stepwise as parts
from ldm_core.pipeline.jobs import ksample
from ldm_core.sampling.noise import prepare_noise
from ldm_core.sampling.sampler_table import SAMPLERS, SamplerEntry
from ldm_core.sampling.schedule import get_sigmas
from ldm_nodes.cli import main as ldm_run
from ldm_nodes.context import NodeContext
from ldm_nodes.registry import headless_registry

DATA = Path(__file__).parents[1] / "data"
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture(scope="module")
def ref():
    with safe_open(str(DATA / "inpaint_refs.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        cases = json.loads(f.metadata()["cases"])
    return tensors, cases


class StubVAE:
    """The recorder's stand-in VAE: encode = the picture cropped to multiples of 8, channels first."""

    factor = 8

    def encode(self, pixels):
        for d in (1, 2):
            keep = pixels.shape[d] // 8 * 8
            pixels = pixels.narrow(d, (pixels.shape[d] % 8) // 2, keep)
        return pixels[..., :3].movedim(-1, 1).clone()


# --- mask ops vs ComfyUI ---------------------------------------------------------------------

def test_pad_for_outpaint_matches_comfyui(ref):
    t, cases = ref
    for k, args in enumerate(cases["pad"]):
        image, mask = masks.pad_for_outpaint(t["pad/image"], *args)
        assert torch.equal(image, t[f"pad/{k}/image"]), args
        assert torch.equal(mask, t[f"pad/{k}/mask"]), args
    assert cases["pad"][0][4] > 0 and 0 < t["pad/0/mask"].min() < 1 or t["pad/0/mask"].unique().numel() > 2


def test_grow_mask_matches_comfyui(ref):
    t, cases = ref
    for k, (expand, tapered) in enumerate(cases["grow"]):
        assert torch.equal(masks.grow(t["grow/mask"], expand, tapered), t[f"grow/{k}"]), (expand, tapered)


def test_feather_mask_matches_comfyui_and_ours_is_symmetric(ref):
    t, cases = ref
    core = headless_registry()["FeatherMask"]  # the core id keeps ComfyUI's numbers exactly
    for k, args in enumerate(cases["feather"]):
        assert torch.equal(masks.feather(t["feather/mask"], *args, comfy_edges=True), t[f"feather/{k}"]), args
        assert torch.equal(core.run(None, t["feather/mask"], *args)[0], t[f"feather/{k}"]), args
    ones = torch.ones(1, 6, 9)
    ours = masks.feather(ones, 3, 2, 3, 2)
    assert torch.equal(ours, ours.flip(-1)) and torch.equal(ours, ours.flip(-2))
    assert ours[0, 3, :3].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    comfy = masks.feather(ones, 3, 2, 3, 2, comfy_edges=True)
    assert comfy[0, 3, -1] == pytest.approx(2 / 3) and comfy[0, 3, 0] == pytest.approx(1 / 9)  # its off-by-one


def test_image_composite_masked_matches_comfyui(ref):
    t, cases = ref
    for k, (x, y, resize, use_mask, alpha) in enumerate(cases["comp"]):
        src = t["comp/src_alpha"] if alpha else t["comp/src"]
        out = masks.composite_images(t["comp/dest"], src, x, y, resize, t["comp/mask"] if use_mask else None)
        assert torch.equal(out, t[f"comp/{k}"]), (x, y, resize, use_mask, alpha)


def test_vae_encode_for_inpaint_matches_comfyui(ref):
    t, cases = ref
    for k, grow in enumerate(cases["enc"]):
        out = inpaint.encode_for_inpaint(StubVAE(), t["enc/pixels"], t["enc/mask"], grow)
        assert torch.equal(out["samples"], t[f"enc/{k}/samples"]), grow
        assert torch.equal(out["noise_mask"], t[f"enc/{k}/noise_mask"]), grow
    # the greyed pixels are exactly 0.5 under the mask
    assert (t["enc/0/samples"] == 0.5).any()


def test_inpaint_model_conditioning_matches_comfyui(ref):
    t, _ = ref
    c = Cond(torch.zeros(1, 77, 8))
    pos, neg, latent = inpaint.inpaint_model_conditioning([c], [c], StubVAE(), t["enc/pixels"], t["enc/mask"], True)
    for side in (pos, neg):
        assert torch.equal(side[0].extra["concat_latent_image"], t["imc/concat_latent_image"])
        assert torch.equal(side[0].extra["concat_mask"], t["imc/concat_mask"])
    assert torch.equal(latent["samples"], t["imc/samples"])
    assert torch.equal(latent["noise_mask"], t["imc/noise_mask"])
    _, _, no_mask = inpaint.inpaint_model_conditioning([c], [c], StubVAE(), t["enc/pixels"], t["enc/mask"], False)
    assert "noise_mask" not in no_mask


def test_noise_mask_resize_and_concat_input_match_comfyui(ref):
    t, cases = ref
    shape = t["cc/noise"].shape
    prepared = masks.to_latent(t["cc/mask_px"], shape)
    assert torch.equal(prepared, t["cc/prepared"])
    config = PRESETS["sd1_inpaint"]
    base = Cond(torch.zeros(1, 77, 8))
    conds = {
        "given": base.with_extra(concat_latent_image=t["cc/concat_latent"], concat_mask=t["cc/concat_mask"]),
        "from_noise_mask": base, "nothing": base,
        "latent_only": base.with_extra(concat_latent_image=t["cc/concat_latent"]),
    }
    for name in cases["cc"]:
        dmask = None if name in ("nothing", "latent_only") else prepared
        got = inpaint.concat_input(config, conds[name], shape, t["cc/latent_image"], dmask)
        assert torch.equal(got, t[f"cc/{name}"]), name


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_masked_euler_run_matches_comfyui(ref, sampler):
    """KnownRegion + the registered solver vs ComfyUI's KSAMPLER/KSamplerX0Inpaint on the exact
    denoiser of Gaussian data; "ddim" re-noises the known region from seed + 1."""
    if sampler not in SAMPLERS:
        pytest.skip(f"{sampler} not registered")
    t, cases = ref
    s2 = cases["run"]["data_std"] ** 2
    sigmas, noise, clean = t["run/sigmas"], t["run/noise"], t["run/latent"]

    def exact(x, sigma):
        return x * s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    known = inpaint.inpaint_noise(SAMPLERS[sampler].inpaint_noise, noise.shape, cases["run"]["seed"], noise)
    d = inpaint.KnownRegion(exact, clean, known, t["cc/prepared"])
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2) + clean  # σ_0 = σ_max: KSampler's start
    out = SAMPLERS[sampler](d, x, sigmas)
    err = (out - t[f"run/{sampler}"]).abs().max().item()
    assert err < 2e-6, err


# --- sampling with a real (tiny) model --------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """models/checkpoints with a tiny SD1 (the workflows' name) and a tiny SD1 inpainting model;
    input/example.png, 75×50 RGB."""
    root = tmp_path_factory.mktemp("run")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "input").mkdir()
    save_checkpoint(shrink(PRESETS["sd1"]), root / "models" / "checkpoints" / "demo_sd1.safetensors", seed=3)
    save_checkpoint(shrink(PRESETS["sd1_inpaint"]), root / "models" / "checkpoints" / "sd1_inpaint.safetensors", seed=4)
    to_pil(torch.rand(1, 50, 75, 3, generator=torch.Generator().manual_seed(0))).save(root / "input" / "example.png")
    return root


@pytest.fixture(scope="module")
def sd1(dirs):
    return load_checkpoint(dirs / "models" / "checkpoints" / "demo_sd1.safetensors", device="cpu")


def _conds(ck, batch=1):
    return [ck.text_encoder.encode("a red ball")], [ck.text_encoder.encode("")]


def test_noise_mask_keeps_known_region_and_full_mask_changes_nothing(sd1):
    pos, neg = _conds(sd1)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 8:48] = 1.0
    kw = dict(seed=5, steps=2, cfg=4.0)
    out = ksample(sd1.model, pos, neg, latent, noise_mask=mask, **kw)
    keep = masks.to_latent(mask, latent.shape) == 0
    err = (out - latent)[keep].abs().max().item()
    assert err < 1e-5, err  # ComfyUI does not re-impose after the last step: Euler's x − (x − z)/σ·σ
    assert (out - latent)[~keep].abs().max() > 0.1
    full = ksample(sd1.model, pos, neg, latent, noise_mask=torch.ones(1, 64, 64), **kw)
    assert torch.equal(full, ksample(sd1.model, pos, neg, latent, **kw))
    none = ksample(sd1.model, pos, neg, latent, noise_mask=torch.zeros(1, 64, 64), **kw)
    assert (none - latent).abs().max() < 1e-5


def test_img2img_denoise_zero_and_start_level(sd1, monkeypatch):
    pos, neg = _conds(sd1)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ksample(sd1.model, pos, neg, latent, seed=1, steps=4, cfg=3.0, denoise=0.0), latent)
    seen = {}

    def spy(denoiser, x, sigmas, **kw):
        seen["x"], seen["sigmas"] = x.clone(), sigmas.clone()
        return x

    monkeypatch.setitem(SAMPLERS, "spy", SamplerEntry(spy, order=1, stochastic=False))
    ksample(sd1.model, pos, neg, latent, seed=9, steps=5, cfg=3.0, sampler="spy", denoise=0.5)
    full = get_sigmas(sd1.model.schedule, "normal", 10)
    assert torch.equal(seen["sigmas"], full[-6:])  # the last 5 steps of a 10-step schedule
    sigma0 = float(full[-6])
    assert sigma0 < float(sd1.model.schedule.sigma_max) / 2
    expected = prepare_noise(latent.shape, 9) * sigma0 + sd1.model.latent_in(latent)
    assert torch.equal(seen["x"], expected)  # z0 + σ_0·ε: the input's structure is kept


# --- inpaint (9-channel) model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1_inpaint(dirs):
    return load_checkpoint(dirs / "models" / "checkpoints" / "sd1_inpaint.safetensors", device="cpu")


def test_inpaint_model_concat_reaches_the_unet(sd1_inpaint):
    ck = sd1_inpaint
    assert inpaint.is_inpaint_model(ck.config) and not inpaint.is_inpaint_model(PRESETS["sd1"])
    cond = ck.text_encoder.encode("x")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([3.0])
    blank = inpaint.concat_input(ck.config, cond, x.shape, None, None)
    assert blank.shape == (1, 5, 8, 8) and torch.equal(blank[:, 0], torch.ones(1, 8, 8))
    assert torch.equal(blank[0, 1:, 0, 0], torch.tensor(inpaint.BLANK_INPAINT_LATENT))
    d = ck.model.denoiser()
    a = d(x, sigma, cond.context, concat=blank)
    b = d(x, sigma, cond.context, concat=torch.zeros_like(blank))
    assert a.shape == x.shape and (a - b).abs().max() > 1e-4  # the extra channels change the prediction


def test_inpaint_model_samples_with_its_conditioning(sd1_inpaint):
    ck = sd1_inpaint
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 20:44] = 1
    pos, neg = [ck.text_encoder.encode("a cat")], [ck.text_encoder.encode("")]
    pos, neg, latent = inpaint.inpaint_model_conditioning(pos, neg, ck.vae, pixels, mask, True)
    out = ksample(ck.model, pos, neg, latent["samples"], seed=1, steps=2, cfg=3.0, noise_mask=latent["noise_mask"])
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    eps, x0 = parts.evaluate(ck.model, pos, neg, 3.0, ck.model.latent_in(latent["samples"]), 2.0)  # one evaluation
    assert x0.shape == eps.shape == latent["samples"].shape and torch.isfinite(x0).all()
    # without a mask and without inpaint conditioning the model still runs (blank input, as ComfyUI)
    plain = ksample(ck.model, [ck.text_encoder.encode("a cat")], [ck.text_encoder.encode("")],
                    torch.zeros(1, 4, 8, 8), seed=1, steps=2, cfg=3.0)
    assert torch.isfinite(plain).all()


# --- pasting back -------------------------------------------------------------------------

def test_composite_keeps_unmasked_pixels_bit_identical():
    g = torch.Generator().manual_seed(7)
    original = torch.rand(2, 21, 30, 3, generator=g)
    generated = torch.rand(2, 16, 24, 3, generator=g)  # the VAE's centre crop of 21×30
    mask = torch.zeros(1, 21, 30)
    mask[:, 5:15, 6:20] = 1.0
    mask[:, 15, 6:20] = 0.25
    for feather in (0, 3):
        out = inpaint.composite_result(original, generated, mask, feather)
        zero = mask[0] == 0
        assert torch.equal(out[:, zero], original[:, zero]), feather
    out = inpaint.composite_result(original, generated, mask, 0)
    dy, dx = (21 - 16) // 2, (30 - 24) // 2
    assert torch.equal(out[:, 5:15, 6:20], generated[:, 5 - dy:15 - dy, 6 - dx:20 - dx])  # mask 1: the result
    soft = inpaint.composite_result(original, generated, mask, 4)
    assert torch.equal(soft[:, 9, 12], generated[:, 9 - dy, 12 - dx])  # 4 px inside the edge: all result
    edge = 0.75 * original[:, 5, 12] + 0.25 * generated[:, 5 - dy, 12 - dx]  # 1 px inside: m = 1/4
    assert torch.allclose(soft[:, 5, 12], edge, atol=1e-6)
    with pytest.raises(masks.MaskError, match="larger than the original"):
        inpaint.composite_result(generated, original, mask, 0)


def test_feather_inward_is_distance_ramp():
    m = torch.zeros(1, 9, 9)
    m[:, 1:8, 1:8] = 1
    f = masks.feather_inward(m, 3)
    assert torch.equal(f[m == 0], torch.zeros(int((m == 0).sum())))
    assert f[0, 4, 1:8].tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 2 / 3, 1 / 3])


def test_bad_inputs_name_the_input():
    with pytest.raises(masks.MaskError, match="mask has 3 entries"):
        inpaint.encode_for_inpaint(StubVAE(), torch.rand(2, 16, 16, 3), torch.ones(3, 16, 16))
    with pytest.raises(masks.MaskError, match="pixels"):
        inpaint.encode_for_inpaint(StubVAE(), torch.rand(16, 16, 3), torch.ones(16, 16))


# --- through the nodes --------------------------------------------------------------------

def test_outpaint_workflow_keeps_the_original_pixels(dirs, capsys):
    """workflows/inpaint.json (pad → encode for inpainting → KSampler → decode → composite) at tiny
    size: the PNG is the padded canvas, and wherever the pad mask is 0 its bytes are the input's."""
    code = ldm_run([str(WORKFLOWS / "inpaint.json"), "--models-dir", str(dirs / "models"), "--input-dir",
                    str(dirs / "input"), "--output-dir", str(dirs / "out"), "--quiet", "--json", "--set", "7.steps=2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = Image.open(summary["images"][0])
    assert out.size == (75 + 32, 50 + 8)
    src = Image.open(dirs / "input" / "example.png")
    image, _ = load_image(dirs / "input" / "example.png")
    _, pad_mask = masks.pad_for_outpaint(image, 16, 0, 16, 8, 12)
    keep = (pad_mask[0] == 0).numpy()
    got = np.asarray(out)[keep]
    canvas = np.full((58, 107, 3), 127, dtype=np.uint8)  # 0.5 grey → 127 after ×255 and truncation
    canvas[0:50, 16:91] = np.asarray(src)
    assert keep.sum() > 1500 and np.array_equal(got, canvas[keep])
    assert not np.array_equal(np.asarray(out)[~keep], canvas[~keep])  # the padded area was generated


def test_inpaint_model_graph_of_core_nodes(dirs):
    """ComfyUI core ids, ComfyUI's inputs: a 9-channel model inpaints through
    InpaintModelConditioning, and ImageCompositeMasked pastes the result back."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1_inpaint.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["4", 0], "left": 8, "top": 8, "right": 0,
                                                             "bottom": 0, "feathering": 0}},
        "6": {"class_type": "GrowMask", "inputs": {"mask": ["5", 1], "expand": 2, "tapered_corners": True}},
        "7": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["5", 0], "mask": ["6", 0],
            "noise_mask": True}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["7", 0], "negative": ["7", 1], "latent_image": ["7", 2], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "ImageCompositeMasked", "inputs": {
            "destination": ["5", 0], "source": ["9", 0], "x": 1, "y": 1, "resize_source": False, "mask": ["6", 0]}},
    }
    ctx = NodeContext.headless(dirs / "models", input_dir=dirs / "input", output_dir=dirs / "out_core")
    result = Executor(headless_registry()).run(graph, ctx, outputs=["10"])
    padded, mask = result.outputs["5"]
    assert padded.shape == (1, 58, 83, 3) and mask.shape == (1, 58, 83)
    cond = result.outputs["7"][0][0]
    assert cond.extra["concat_latent_image"].shape == (1, 4, 7, 10)
    assert cond.extra["concat_mask"].shape == (1, 1, 56, 80)
    out = result.outputs["10"][0]
    assert out.shape == padded.shape and torch.isfinite(out).all()
    # ComfyUI's semantics: the mask is resized to the source (56×80) and pasted with it at (1, 1)
    m = torch.nn.functional.interpolate(result.outputs["6"][0][None], size=(56, 80), mode="bilinear")[0, 0]
    box = (slice(1, 57), slice(1, 81))
    assert torch.equal(out[0][box][m == 0], padded[0][box][m == 0])
    assert not torch.equal(out[0][box][m == 1], padded[0][box][m == 1])
    assert torch.equal(out[0, 0], padded[0, 0]) and torch.equal(out[0, :, 81:], padded[0, :, 81:])


def test_coordinate_channels_are_not_concat_inputs():
    """A coord_channels model (the embedded one) has 2 inputs beyond the latent that it makes
    itself: plain (non-inpaint) conditioning is left as is, no "concat" is asked for."""
    from ldm_core.conditioning.inpaint import concat_channels, is_inpaint_model, with_concat
    from ldm_core.networks.config import ModelConfig, UNetConfig

    config = ModelConfig(unet=UNetConfig(in_channels=6), coord_channels=True)
    assert concat_channels(config) == 0 and not is_inpaint_model(config)
    conds = [Cond(context=torch.zeros(1, 77, 768))]
    assert with_concat(config, conds, (1, 4, 8, 8), None, None) == conds
    with pytest.raises(inpaint.MaskError, match="2 extra input channels"):
        with_concat(ModelConfig(unet=UNetConfig(in_channels=6)), conds, (1, 4, 8, 8), None, None)
