"""Regional classifier-free guidance: parity with ComfyUI's calc_cond_batch on a toy model
(recorded by tests/tools/record_cond_refs.py), and known answers for feathering, weights,
masks, mask bounds, timestep ranges and batching."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm_core.conditioning import cond as C
from ldm_core.conditioning.cond import Area, Cond, ConditioningError
from ldm_core.networks.config import ScheduleConfig
from ldm_core.networks.presets import PRESETS
from ldm_core.sampling.guidance import (
    CFGGuider,
    area_window,
    feather,
    mask_bounds_area,
    percent_to_sigma,
    region_weight,
    resolve,
)
from ldm_core.sampling.schedule import DiscreteSchedule

DATA = Path(__file__).parents[1] / "data"
SD = DiscreteSchedule(ScheduleConfig())
CONFIG = PRESETS["sd1"]  # only its adm ("none") is read


def toy_x0(x, sigma, context, y=None, concat=None):
    """The recorder's toy model: 0.5·x + token-mean of context[..., :C] + 0.01·σ (+ channel-mean of concat)."""
    out = 0.5 * x + context.mean(dim=1)[:, : x.shape[1], None, None] + 0.01 * sigma.reshape(-1, 1, 1, 1)
    if concat is not None:
        out = out + concat.mean(dim=1, keepdim=True)
    return out


def constant_x0(x, sigma, context, y=None, concat=None):
    """x̂0 = context[0, 0] everywhere: each entry's output is a known constant."""
    return context[:, 0, 0].reshape(-1, 1, 1, 1).expand_as(x).clone()


def cond(value: float, tokens: int = 77) -> Cond:
    return Cond(torch.full((1, tokens, 8), float(value)))


# ---- parity with ComfyUI ----

def _ours(name: str, side: str, spec: dict, f) -> list[Cond]:
    out = []
    for i, e in enumerate(spec[side]):
        key = f"{name}.{side}.{i}"
        c = [Cond(f.get_tensor(f"{key}.ctx"))]
        if "concat" in e:
            c = [c[0].with_extra(concat=f.get_tensor(f"{key}.concat"))]
        area = e.get("area")
        if area is not None and area[0] == "percentage":
            _, h, w, y, x = area
            c = C.set_area_percentage(c, w, h, x, y)
        elif area is not None:
            h, w, y, x = area
            c = C.set_area(c, w * 8, h * 8, x * 8, y * 8)
        if "mask" in e:
            c = C.set_mask(c, f.get_tensor(f"{key}.mask"), e.get("mask_strength", 1.0),
                           "mask bounds" if e.get("bounds") else "default")
        if "strength" in e:
            c = C.set_area_strength(c, e["strength"])
        if "start" in e:
            c = C.set_timestep_range(c, e["start"], e["end"])
        out += c
    return out


def _scenarios():
    with safe_open(DATA / "cond_guidance_refs.safetensors", "pt") as f:
        return json.loads(f.metadata()["scenarios"])


@pytest.mark.parametrize("name", sorted(_scenarios()))
def test_guidance_matches_comfyui_calc_cond_batch(name):
    with safe_open(DATA / "cond_guidance_refs.safetensors", "pt") as f:
        spec = json.loads(f.metadata()["scenarios"])[name]
        x = f.get_tensor(f"{name}.x")
        guider = CFGGuider(toy_x0, CONFIG, _ours(name, "positive", spec, f), _ours(name, "negative", spec, f),
                           spec["cfg"], (x.shape[-2] * 8, x.shape[-1] * 8), schedule=SD)
        ref = f.get_tensor(f"{name}.out")
        for s, want in zip(f.get_tensor(f"{name}.sigmas"), ref):
            got = guider(x, s.reshape(1).repeat(x.shape[0]))
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6, msg=f"{name} at σ={float(s)}")


def test_percent_to_sigma_known_values():
    # ComfyUI's ModelSamplingDiscrete.percent_to_sigma(0.5) on SD's schedule = σ(t = 499.5)
    assert percent_to_sigma(SD, 0.5) == pytest.approx(1.6155803203582764, rel=1e-7)
    assert percent_to_sigma(SD, 0.0) > 1e8 and percent_to_sigma(SD, 1.0) == 0.0
    assert percent_to_sigma(SD, 0.25) == pytest.approx(float(SD.sigma(torch.tensor(0.75 * 999))), rel=1e-7)


# ---- known answers ----

def test_feather_ramp_known_values():
    assert feather(8, 4, 16).tolist() == [0.5, 1, 1, 1, 1, 1, 1, 0.5]  # r = min(8, 8 // 4) = 2
    assert feather(8, 0, 16).tolist() == [1, 1, 1, 1, 1, 1, 1, 0.5]  # top edge on the border: no ramp
    assert feather(8, 8, 16).tolist() == [0.5, 1, 1, 1, 1, 1, 1, 1]
    assert feather(40, 10, 64).tolist()[:8] == [(t + 1) / 8 for t in range(8)]  # r capped at 8
    assert feather(3, 1, 16).tolist() == [1, 1, 1]  # 3 // 4 = 0 cells of ramp


def test_area_composition_is_the_weighted_mean_with_feathered_edges():
    x = torch.zeros(1, 4, 16, 16)
    sigma = torch.tensor([1.0])
    entries = [cond(1.0)] + C.set_area([cond(5.0)], 64, 64, 32, 32, strength=2.0)  # 8×8 cells at (4, 4)
    out = CFGGuider(constant_x0, CONFIG, entries, [], 1.0, (128, 128))(x, sigma)
    ramp = torch.tensor([0.5, 1, 1, 1, 1, 1, 1, 0.5])
    m = 2.0 * ramp[:, None] * ramp[None, :]
    want = torch.ones(16, 16)
    want[4:12, 4:12] = (1.0 + 5.0 * m) / (1.0 + m)
    torch.testing.assert_close(out[0, 0], want, atol=1e-6, rtol=0)
    assert torch.equal(out[0, 0], out[0, 3])


def test_cells_no_entry_covers_are_zero_and_strength_zero_contributes_nothing():
    x = torch.randn(1, 4, 16, 16)
    sigma = torch.tensor([1.0])
    only_area = C.set_area([cond(3.0)], 64, 64, 0, 0)  # top-left 8×8 cells, ramp on the inner edges
    out = CFGGuider(constant_x0, CONFIG, only_area, [], 1.0, (128, 128))(x, sigma)
    assert torch.equal(out[0, :, 8:, :], torch.zeros(4, 8, 16)) and torch.equal(out[0, :, :, 8:], torch.zeros(4, 16, 8))
    torch.testing.assert_close(out[0, :, :8, :8], torch.full((4, 8, 8), 3.0))
    silent = [cond(1.0)] + C.set_area_strength([cond(9.0)], 0.0)
    torch.testing.assert_close(CFGGuider(constant_x0, CONFIG, silent, [], 1.0, (128, 128))(x, sigma),
                               torch.ones_like(x))


def test_cfg_mixes_the_sides_per_cell():
    x = torch.zeros(1, 4, 8, 8)
    sigma = torch.tensor([1.0])
    out = CFGGuider(constant_x0, CONFIG, [cond(3.0)], [cond(1.0)], 4.0, (64, 64))(x, sigma)
    torch.testing.assert_close(out, torch.full_like(x, 1.0 + 4.0 * (3.0 - 1.0)))


def test_mask_weight_is_resized_and_scaled():
    x = torch.zeros(2, 4, 8, 8)
    sigma = torch.tensor([1.0, 1.0])
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # right half, at pixel resolution
    entries = [cond(1.0)] + C.set_area_strength(C.set_mask([cond(4.0)], mask, strength=0.5), 2.0)
    out = CFGGuider(constant_x0, CONFIG, entries, [], 1.0, (64, 64))(x, sigma)
    m = 0.5 * 2.0  # mask · mask strength · strength, no feathering with a mask
    torch.testing.assert_close(out[:, :, :, 4:], torch.full((2, 4, 8, 4), (1.0 + 4.0 * m) / (1.0 + m)))
    torch.testing.assert_close(out[:, :, :, :4], torch.ones(2, 4, 8, 4))


def test_mask_bounds_area():
    mask = torch.zeros(1, 16, 16)
    mask[0, 3:6, 2:14] = 0.3
    assert mask_bounds_area(mask) == (8, 12, 3, 2)  # height raised to the minimum of 8 cells
    assert mask_bounds_area(torch.zeros(2, 16, 16)) == (8, 8, 0, 0)
    region = resolve(C.set_mask([cond(1.0)], mask, 1.0, "mask bounds")[0], 0, (16, 16), None)
    assert region.area == (8, 12, 3, 2)
    assert area_window(region.area, (1, 4, 10, 16)) == (7, 12, 3, 2)  # clamped to the latent


def test_timestep_range_skips_the_entry_outside_its_sigmas():
    x = torch.zeros(1, 4, 8, 8)
    late = C.set_timestep_range([cond(5.0)], 0.5, 1.0)
    guider = CFGGuider(constant_x0, CONFIG, [cond(1.0)] + late, [], 1.0, (64, 64), schedule=SD)
    edge = percent_to_sigma(SD, 0.5)
    assert float(guider(x, torch.tensor([edge * 1.001]))[0, 0, 0, 0]) == pytest.approx(1.0)
    assert float(guider(x, torch.tensor([edge]))[0, 0, 0, 0]) == pytest.approx(3.0)  # the edge is inside
    assert float(guider(x, torch.tensor([0.03]))[0, 0, 0, 0]) == pytest.approx(3.0)
    with pytest.raises(ConditioningError, match="schedule"):
        CFGGuider(constant_x0, CONFIG, late, [], 1.0, (64, 64))(x, torch.tensor([1.0]))


def test_same_shape_areas_share_one_forward_and_match_separate_runs():
    calls = []

    def counting(x, sigma, context, y=None, concat=None):
        calls.append(x.shape[0])
        return toy_x0(x, sigma, context)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, 16, generator=g)
    sigma = torch.tensor([2.0])
    entries = [Cond(torch.randn(1, 77, 8, generator=g)) for _ in range(4)]
    entries = (C.set_area(entries[:1], 64, 64, 0, 0) + C.set_area(entries[1:2], 64, 64, 64, 64)
               + C.set_area(entries[2:3], 64, 64, 32, 0) + entries[3:])
    batched = CFGGuider(counting, CONFIG, entries, [], 1.0, (128, 128))(x, sigma)
    assert sorted(calls) == [1, 3]  # three 8×8 crops in one forward, the global entry alone
    single = [CFGGuider(toy_x0, CONFIG, [e], [], 1.0, (128, 128)) for e in entries]
    # the plain weighted mean, assembled from one-entry guiders and the weights they imply
    num = torch.zeros_like(x)
    den = torch.full_like(x, 1e-37)
    for e, gdr in zip(entries, single):
        region = gdr.regions((16, 16))[0]
        h, w, y0, x0 = area_window(region.area, x.shape)
        m = region_weight(region, x.shape[0], x.device, (h, w, y0, x0), (16, 16))
        num[:, :, y0:y0 + h, x0:x0 + w] += toy_x0(x[:, :, y0:y0 + h, x0:x0 + w], sigma, e.context) * m
        den[:, :, y0:y0 + h, x0:x0 + w] += m
    torch.testing.assert_close(batched, num / den, atol=1e-6, rtol=1e-6)


def test_concat_is_cropped_to_the_area():
    x = torch.zeros(1, 4, 16, 16)
    extra = torch.arange(16.0).reshape(1, 1, 1, 16).expand(1, 2, 16, 16)
    entry = C.set_area([cond(0.0).with_extra(concat=extra)], 64, 128, 64, 0)  # cells y 0..15, x 8..15
    out = CFGGuider(toy_x0, CONFIG, entry, [], 1.0, (128, 128))(x, torch.tensor([0.0]))
    torch.testing.assert_close(out[0, 0, 0, 8:], torch.arange(8.0, 16.0))
    bad = [cond(0.0).with_extra(concat=torch.zeros(1, 2, 8, 8))]
    with pytest.raises(ConditioningError, match="concat"):
        CFGGuider(toy_x0, CONFIG, bad, [], 1.0, (128, 128))(x, torch.tensor([1.0]))


def test_bad_regions_are_named():
    x = torch.zeros(2, 4, 8, 8)
    outside = [Cond(torch.zeros(1, 77, 8), area=Area(4, 4, 9, 0))]
    with pytest.raises(ConditioningError, match="outside"):
        CFGGuider(constant_x0, CONFIG, outside, [], 1.0, (64, 64))(x, torch.tensor([1.0, 1.0]))
    three = C.set_mask([cond(1.0)], torch.ones(3, 8, 8))
    with pytest.raises(ConditioningError, match="batch"):
        CFGGuider(constant_x0, CONFIG, three, [], 1.0, (64, 64))(torch.zeros(4, 4, 8, 8), torch.ones(4))


def test_real_unet_area_entry_with_concat_equals_its_crop_run_alone():
    """An inpaint-style UNet (4 + 5 input channels): the guider runs an area entry on its crop,
    with the concat input cropped alike, and composes it with the feathered weight."""
    from ldm_core.networks.presets import shrink
    from ldm_core.networks.unet import UNetModel
    from ldm_core.sampling.denoiser import Denoiser

    cfg = shrink(PRESETS["sd1_inpaint"])
    cfg = cfg.replace(unet=cfg.unet.replace(channel_mult=(1, 2), transformer_depth=(1, 1), num_res_blocks=1))
    torch.manual_seed(0)
    unet = UNetModel(cfg.unet).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    den = Denoiser(unet, SD, "eps", torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 16, 16, generator=g)
    extra = torch.randn(1, 5, 16, 16, generator=g)
    ctx_a, ctx_b = (torch.randn(1, 77, cfg.unet.context_dim, generator=g) for _ in range(2))
    entries = [Cond(ctx_a).with_extra(concat=extra)] + C.set_area([Cond(ctx_b).with_extra(concat=extra)],
                                                                  64, 64, 32, 64, strength=1.5)
    sigma = torch.tensor([2.0])
    with torch.inference_mode():
        got = CFGGuider(den, cfg, entries, [], 1.0, (128, 128))(x, sigma)
        full = den(x, sigma, ctx_a, concat=extra)
        crop = den(x[:, :, 8:16, 4:12], sigma, ctx_b, concat=extra[:, :, 8:16, 4:12])
    ramp_y = feather(8, 8, 16)  # bottom edge on the border: ramp only at the top
    ramp_x = feather(8, 4, 16)
    m = 1.5 * ramp_y[:, None] * ramp_x[None, :]
    want = full.clone()
    want[:, :, 8:16, 4:12] = (full[:, :, 8:16, 4:12] + crop * m) / (1.0 + m)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pixel_areas_follow_a_vae_with_a_smaller_factor():
    """Area nodes store ComfyUI's 8-pixel cells; on an f = 4 model (the embedded one) the guider
    doubles them, so a 64-pixel-wide area still covers 64 pixels (16 latent cells). Fractions stay."""
    config = PRESETS["sd1"]
    f4 = config.replace(vae=config.vae.replace(ch_mult=(1, 2, 2)))
    assert f4.vae.downsample_factor == 4
    (cond,) = C.set_area([Cond(context=torch.zeros(1, 77, 768))], width=64, height=32, x=64, y=8)

    def denoiser(x, sigma, context, y=None, **kw):
        return torch.zeros_like(x)

    for cfg, cells in ((config, (4, 8, 1, 8)), (f4, (8, 16, 2, 16))):
        guider = CFGGuider(denoiser, cfg, [cond], [Cond(context=torch.zeros(1, 77, 768))], 5.0, (128, 128))
        area = next(r.area for r in guider.regions((32, 32)) if r.side == 0)
        assert area == cells
    (frac,) = C.set_area_percentage([Cond(context=torch.zeros(1, 77, 768))], 0.5, 0.5, 0.25, 0.0)
    guider = CFGGuider(denoiser, f4, [frac], [Cond(context=torch.zeros(1, 77, 768))], 5.0, (128, 128))
    assert next(r.area for r in guider.regions((32, 32)) if r.side == 0) == (16, 16, 0, 8)
