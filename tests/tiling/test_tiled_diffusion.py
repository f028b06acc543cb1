"""Tiled diffusion (MultiDiffusion): window planning, blending weights, and exactness where it must be exact."""
from __future__ import annotations

import pytest
import torch

from ldm_core.sampling.solvers import sample_euler
from ldm_core.tiling.tiled_diffusion import TiledDenoiser, Window, plan_windows, window_weight


def pointwise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A denoiser with no spatial coupling: tiling it must change nothing."""
    s = sigma.reshape(-1, 1, 1, 1)
    return x / (1 + s**2) + 0.3 * torch.tanh(x) * s / (1 + s)


@pytest.mark.parametrize("size,tile,overlap", [((37, 53), 16, 4), ((16, 16), 16, 8), ((9, 40), 12, 11), ((64, 24), 32, 0)])
def test_windows_cover_the_latent_with_the_requested_overlap(size, tile, overlap) -> None:
    h, w = size
    windows = plan_windows(h, w, tile, overlap)
    count = torch.zeros(h, w)
    for win in windows:
        assert win.height == min(tile, h) and win.width == min(tile, w)
        win.crop(count).add_(1)
    assert (count >= 1).all()
    tops = sorted({win.top for win in windows})
    for a, b in zip(tops, tops[1:]):
        assert b - a <= tile - overlap  # neighbours share at least `overlap` rows
    assert max(win.top + win.height for win in windows) == h and max(win.left + win.width for win in windows) == w


def test_feather_weights_ramp_only_at_inner_edges() -> None:
    win = Window(0, 8, 16, 16)
    weight = window_weight(win, 16, 40, overlap=4, mode="feather")
    assert torch.equal(weight[:, 4:12], torch.ones(16, 8))  # interior and the border-touching top/bottom
    assert torch.allclose(weight[0, :4], torch.tensor([0.2, 0.4, 0.6, 0.8]))  # left edge is inside the latent
    assert torch.allclose(weight[0, 12:], torch.tensor([0.8, 0.6, 0.4, 0.2]))
    assert torch.equal(window_weight(win, 16, 40, 4, "uniform"), torch.ones(16, 16))


@pytest.mark.parametrize("mode", ["uniform", "feather"])
@pytest.mark.parametrize("shape,tile,overlap", [((2, 4, 37, 53), 16, 6), ((1, 4, 73, 97), 32, 8)])
def test_a_pointwise_denoiser_is_unchanged_by_tiling(mode, shape, tile, overlap) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((shape[0],), 2.5)
    tiled = TiledDenoiser(lambda win: pointwise, plan_windows(*shape[-2:], tile, overlap), *shape[-2:], overlap, mode)
    err = (tiled(x, sigma) - pointwise(x, sigma)).abs().max().item()
    assert err < 1e-6, err


def test_one_window_over_everything_is_the_plain_denoiser_bit_for_bit() -> None:
    x = torch.randn(1, 4, 20, 28)
    sigma = torch.tensor([1.7])
    tiled = TiledDenoiser(lambda win: pointwise, plan_windows(20, 28, 64, 8), 20, 28, 8)
    assert torch.equal(tiled(x, sigma), pointwise(x, sigma))


def test_a_whole_sampling_run_matches_untiled_for_a_pointwise_denoiser() -> None:
    x = torch.randn(1, 4, 30, 45, generator=torch.Generator().manual_seed(1)) * 14.6
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])
    tiled = TiledDenoiser(lambda win: pointwise, plan_windows(30, 45, 16, 4), 30, 45, 4)
    a, b = sample_euler(tiled, x, sigmas), sample_euler(pointwise, x, sigmas)
    assert (a - b).abs().max().item() < 1e-5


def test_each_window_gets_its_own_conditioning_built_once() -> None:
    built = []

    def denoiser_for(win: Window):
        built.append(win.key)
        value = {"sky": 1.0, "sea": -1.0}[win.key]
        return lambda x, sigma: torch.full_like(x, value)

    windows = [Window(0, 0, 8, 16, key="sky"), Window(6, 0, 10, 16, key="sea")]
    tiled = TiledDenoiser(denoiser_for, windows, 16, 16, overlap=2, mode="uniform")
    for _ in range(3):
        out = tiled(torch.zeros(1, 4, 16, 16), torch.tensor([1.0]))
    assert sorted(built) == ["sea", "sky"]  # cached across steps
    assert (out[..., :6, :] == 1).all() and (out[..., 8:, :] == -1).all()
    assert torch.allclose(out[..., 6:8, :], torch.zeros(1, 4, 2, 16))  # overlap: the average


def test_bad_plans_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="uncovered"):
        TiledDenoiser(lambda w: pointwise, [Window(0, 0, 8, 8)], 8, 16, 0)
    with pytest.raises(ValueError, match="outside"):
        TiledDenoiser(lambda w: pointwise, [Window(4, 0, 8, 8)], 8, 8, 0)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(32, 32, 16, 16)
    tiled = TiledDenoiser(lambda w: pointwise, plan_windows(8, 8, 8, 0), 8, 8, 0)
    with pytest.raises(ValueError, match="planned"):
        tiled(torch.zeros(1, 4, 9, 8), torch.tensor([1.0]))


def regional_toy(x, sigma, context, y=None, concat=None):
    """A guided-model stand-in with no spatial coupling: the prompt enters as a constant, the
    inpaint input per cell — so the whole guider, areas and masks included, is pointwise."""
    s = sigma.reshape(-1, 1, 1, 1)
    out = x / (1 + s**2) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    if concat is not None:
        out = out + 0.5 * concat.mean(dim=1, keepdim=True)
    return out


def test_windows_of_a_regional_guider_place_areas_masks_and_concat_on_the_whole_latent() -> None:
    from ldm_core.conditioning import cond as C
    from ldm_core.conditioning.cond import Cond
    from ldm_core.networks.presets import PRESETS
    from ldm_core.sampling.guidance import CFGGuider

    g = torch.Generator().manual_seed(3)
    def prompt(v):
        return Cond(torch.full((1, 77, 8), v))
    H, W = 40, 56
    concat = torch.randn(1, 5, H, W, generator=g)
    mask = (torch.rand(1, 20, 28, generator=g) > 0.5).float()  # resized onto the latent
    positive = ([prompt(1.0).with_extra(concat=concat)] + C.set_area([prompt(3.0)], 200, 160, 96, 64)
                + C.set_mask([prompt(-2.0)], mask, 0.7))
    negative = [prompt(0.0).with_extra(concat=concat)]
    guider = CFGGuider(regional_toy, PRESETS["sd1"], positive, negative, 4.0, (H * 8, W * 8))
    x = torch.randn(2, 4, H, W, generator=g)
    sigma = torch.full((2,), 3.0)
    whole = guider(x, sigma)
    for tile, overlap, mode in [(16, 4, "feather"), (24, 8, "uniform"), (13, 5, "feather")]:
        tiled = TiledDenoiser(lambda win: guider.window((H, W), win.top, win.left), plan_windows(H, W, tile, overlap),
                              H, W, overlap, mode)
        err = (tiled(x, sigma) - whole).abs().max().item()
        assert err < 1e-5, (tile, err)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    from ldm_core.checkpoints.synthetic import save_checkpoint
    from ldm_core.loading.loader import load_checkpoint
    from ldm_core.networks.presets import PRESETS, shrink

    path = save_checkpoint(shrink(PRESETS["sd1"]), tmp_path_factory.mktemp("md") / "sd1.safetensors", seed=2)
    return load_checkpoint(path, device="cpu")


def test_tiled_ksample_with_one_window_is_ksample_bit_for_bit_and_small_tiles_run(tiny_sd1) -> None:
    from ldm_core.pipeline.jobs import Tiling, ksample

    ck = tiny_sd1
    pos, neg = [ck.text_encoder.encode("a red circle")], [ck.text_encoder.encode("")]
    latent = torch.zeros(1, 4, 12, 20)
    kw = dict(seed=4, steps=2, cfg=5.0, sampler="dpmpp_2m", scheduler="karras")
    plain = ksample(ck.model, pos, neg, latent, **kw)
    one = ksample(ck.model, pos, neg, latent, tiling=Tiling(32, 8), **kw)
    assert torch.equal(one, plain)
    tiled = ksample(ck.model, pos, neg, latent, tiling=Tiling(8, 4), **kw)
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, plain)


def test_sampling_reports_a_preview_of_each_step(tiny_sd1) -> None:
    from ldm_core.pipeline.jobs import ksample

    seen = []

    class Recorder:
        def start(self, total):
            seen.append(("start", total))

        def update(self, done, total, preview=None):
            seen.append((done, preview()))

        def finish(self):
            seen.append("finish")

    ck = tiny_sd1
    ksample(ck.model, [ck.text_encoder.encode("x")], [ck.text_encoder.encode("")], torch.zeros(1, 4, 6, 10),
            seed=1, steps=3, cfg=2.0, progress=Recorder())
    assert seen[0] == ("start", 3) and seen[-1] == "finish"
    assert [s[0] for s in seen[1:-1]] == [1, 2, 3]
    assert all(s[1].shape == (6, 10, 3) and s[1].dtype.name == "uint8" for s in seen[1:-1])
