"""Tiled VAE: exact mode equals the untiled model, fast mode is measured, tiles leave no seams.

Random real-layout weights (`synth.random_state_dict`): a narrow 3-level VAE (f = 4) for
the odd-shaped cases, the SD layout narrowed (`shrink`), and the SD widths on a tiny
latent. Equivalence is max |tiled − untiled| in fp32, same weights, same input.
"""
from __future__ import annotations

import logging

import pytest
import torch

from ldm_core.checkpoints.synthetic import random_state_dict
from ldm_core.loading.model import VAE
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.config import VAEConfig
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.tiling.parking import DiskMap
from ldm_core.tiling.tile_grid import GroupStats, grid, spans
from ldm_core.tiling.tiled_vae import TileOptions, TilingError, auto_tile, decode_tiled, encode_tiled

TOL = 1e-4
NARROW = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)  # f = 4
SD_NARROW = shrink(PRESETS["sd1"]).vae  # SD layout, width 32
SD = PRESETS["sd1"].vae  # SD widths (128 … 512)


def vae(config: VAEConfig, seed: int = 1) -> AutoencoderKL:
    return AutoencoderKL.from_state_dict(config, random_state_dict(AutoencoderKL, config, seed))


@pytest.fixture(scope="module")
def narrow() -> AutoencoderKL:
    return vae(NARROW)


def latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """[-1, 1] with smooth structure plus fine noise (so statistics vary across the image)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 16 + 2, w // 16 + 2, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return (0.8 * smooth + 0.2 * torch.rand(1, 3, h, w, generator=g)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- geometry and statistics

@pytest.mark.parametrize("size,tile,align", [(1, 64, 1), (97, 32, 1), (388, 96, 4), (100, 7, 1), (64, 64, 8)])
def test_spans_cover_the_axis_once_within_the_tile(size, tile, align):
    s = spans(size, tile, align)
    assert s[0][0] == 0 and s[-1][1] == size and all(a < b for a, b in s)
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(s, s[1:]))
    assert all(b - a <= tile + align for a, b in s)
    assert all(a % align == 0 for a, _ in s)


def test_auto_tile_follows_free_memory_up_to_a_cap():
    model = vae(SD_NARROW)  # widest full-resolution width 64: 1 KiB per pixel of working set
    assert SD_NARROW.ch * max(SD_NARROW.ch_mult[:2]) == 64
    cpu = torch.device("cpu")
    assert auto_tile(model, cpu, free=2 << 30) == 256  # 64 MiB budget: sqrt(64 Mi / 1 Ki) = 256
    assert auto_tile(model, cpu, free=64 << 30) == 512  # capped at 256 MiB
    assert auto_tile(model, cpu, free=0) == 160  # floor 32 MiB: sqrt(32 Mi / 1 Ki) = 181 → 160
    assert auto_tile(model, cpu, free=64 << 30, mode="fast") == 1024  # fast: capped at 1 GiB


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_stats_merged_over_tiles_equal_whole_map_statistics(memory_format):
    x = torch.randn(2, 16, 37, 53, generator=torch.Generator().manual_seed(3)) * 3 + 5
    stats = GroupStats(2, 4)
    for y0, y1, x0, x1 in grid(37, 53, 10):
        stats.add(x[:, :, y0:y1, x0:x1].contiguous(memory_format=memory_format))
    ref = x.double().reshape(2, 4, -1)
    assert torch.allclose(stats.mean, ref.mean(-1), rtol=0, atol=1e-6)
    assert torch.allclose(stats.var, ref.var(-1, correction=0), rtol=1e-6, atol=0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        scale, shift = stats.affine(norm, x)
        assert max_diff(x * scale + shift, norm(x)) <= 1e-5


# ---------------------------------------------------------------- exact mode equals untiled

@pytest.mark.parametrize("shape,tile", [((73, 97), 96), ((31, 45), 40)])
def test_exact_decode_equals_untiled_at_odd_shapes(narrow, shape, tile):
    z = latent(*shape)
    with torch.inference_mode():
        ref = narrow.decode(z)
        out = decode_tiled(narrow, z, TileOptions(tile))
    print(f"decode NARROW latent {shape} tile {tile}: max|Δ| {max_diff(out, ref):.2e} (max|ref| {ref.abs().max():.2f})")
    assert out.shape == ref.shape and max_diff(out, ref) <= TOL


@pytest.mark.parametrize("shape,tile", [((292, 388), 96), ((124, 180), 40)])
def test_exact_encode_equals_untiled_at_odd_shapes(narrow, shape, tile):
    x = image(*shape)
    with torch.inference_mode():
        ref = narrow.encode(x)
        out = encode_tiled(narrow, x, TileOptions(tile))
    d_mean, d_logvar = max_diff(out.mean, ref.mean), max_diff(out.logvar, ref.logvar)
    print(f"encode NARROW image {shape} tile {tile}: max|Δ| mean {d_mean:.2e}, logvar {d_logvar:.2e}")
    assert d_mean <= TOL and d_logvar <= TOL


@pytest.mark.parametrize("config,shape,tile", [(SD_NARROW, (13, 19), 48), (SD, (5, 7), 32)], ids=["sd-narrow", "sd-width"])
def test_exact_tiling_equals_untiled_in_the_sd_layout(config, shape, tile):
    model = vae(config)
    z = latent(*shape)
    x = image(8 * shape[0], 8 * shape[1])
    with torch.inference_mode():
        d_dec = max_diff(decode_tiled(model, z, TileOptions(tile)), model.decode(z))
        d_enc = max_diff(encode_tiled(model, x, TileOptions(tile)).mean, model.encode(x).mean)
    print(f"SD layout ch={config.ch} latent {shape} tile {tile}: decode max|Δ| {d_dec:.2e}, encode {d_enc:.2e}")
    assert d_dec <= TOL and d_enc <= TOL


@pytest.mark.parametrize("park", ["disk", "hybrid"])
def test_parking_on_disk_gives_the_same_bits_as_in_memory(narrow, park):
    z, x = latent(21, 26, seed=2), image(84, 104, seed=2)
    with torch.inference_mode():
        mem = decode_tiled(narrow, z, TileOptions(40, park="cpu"))
        disk = decode_tiled(narrow, z, TileOptions(40, park=park))
        enc_mem = encode_tiled(narrow, x, TileOptions(40, park="cpu")).mean
        enc_disk = encode_tiled(narrow, x, TileOptions(40, park=park)).mean
    assert torch.equal(mem, disk) and torch.equal(enc_mem, enc_disk)
    assert max_diff(disk, narrow.decode(z)) <= TOL


def test_hybrid_parking_keeps_the_maps_in_memory_within_one_full_resolution_map(narrow, monkeypatch):
    """Maps go to memory while the live ones stay within the budget (one full-resolution map of
    the first width), the rest to disk; the count drops as maps are freed (views keep theirs)."""
    import ldm_core.tiling.tiled_vae as tv

    seen = {"peak": 0, "disk": 0, "memory": 0, "budget": 0}
    real = tv._Parking._in_memory

    def spy(self, nbytes):
        where = real(self, nbytes)
        seen["budget"] = self.budget
        seen["disk" if where is None else "memory"] += 1
        seen["peak"] = max(seen["peak"], self.live)
        return where

    monkeypatch.setattr(tv._Parking, "_in_memory", spy)
    z = latent(21, 26, seed=3)
    with torch.inference_mode():
        out = decode_tiled(narrow, z, TileOptions(40, park="hybrid"))
    assert seen["budget"] == NARROW.ch * NARROW.ch_mult[0] * 84 * 104 * 4
    assert seen["disk"] >= 1 and seen["memory"] >= 1 and 0 < seen["peak"] <= seen["budget"]
    assert max_diff(out, narrow.decode(z)) <= TOL


def test_disk_map_round_trips_windows_bit_for_bit():
    a = torch.randn(1, 5, 7, 9)
    m = DiskMap.of(a)
    assert torch.equal(m.to("cpu"), a) and torch.equal(m[:, :, 2:5, 3:8], a[:, :, 2:5, 3:8])
    m[:, :, 1:3, 0:2] = torch.ones(1, 5, 2, 2)
    assert m[:, :, 1:3, 0:2].eq(1).all() and torch.equal(m[:, :, 3:7, :], a[:, :, 3:7, :])
    with pytest.raises(ValueError, match="does not fit"):
        m[:, :, 0:2, 0:2] = torch.ones(1, 5, 3, 2)


# ---------------------------------------------------------------- seams

def seam_ratio(img: torch.Tensor, tile: int, f: int) -> float:
    """Mean squared step across tile borders ÷ the same across other latent-cell borders (worst axis).

    Tile borders fall on latent-cell borders (multiples of f), where a decoder's nearest
    upsampling leaves its own texture, so they are compared with the other cell borders.
    """
    dx = (img[..., :, 1:] - img[..., :, :-1]).square().mean(dim=(0, 1, 2))  # gap j: between j and j + 1
    dy = (img[..., 1:, :] - img[..., :-1, :]).square().mean(dim=(0, 1, 3))
    ratios = []
    for d, n in ((dx, img.shape[-1]), (dy, img.shape[-2])):
        border = torch.zeros(n - 1, dtype=torch.bool)
        border[[b - 1 for _, b in spans(n, tile)[:-1]]] = True
        cell = torch.arange(n - 1) % f == f - 1
        ratios.append((d[border].mean() / d[cell & ~border].mean()).item())
    return max(ratios)


def test_no_border_excess_in_exact_and_fast_but_a_naive_tiling_shows_it(narrow):
    # A latent whose level and contrast drift across the image, as real content does.
    ramp = torch.linspace(-1, 1, 64)[None, None, None, :] + torch.linspace(-1, 1, 48)[None, None, :, None]
    z, tile = latent(48, 64, seed=5) * (1 + 0.5 * ramp) + 2 * ramp, 64  # image 192×256: 3×4 tiles
    with torch.inference_mode():
        untiled = narrow.decode(z)
        exact = decode_tiled(narrow, z, TileOptions(tile))
        fast = decode_tiled(narrow, z, TileOptions(tile, "fast"))
        naive = torch.empty_like(exact)  # each tile decoded on its own: its own GroupNorm statistics
        lt = tile // 4
        for y0, y1, x0, x1 in grid(48, 64, lt):
            naive[..., 4 * y0:4 * y1, 4 * x0:4 * x1] = narrow.decode(z[..., y0:y1, x0:x1])
    r_ref, r_exact, r_fast, r_naive = (seam_ratio(img, tile, 4) for img in (untiled, exact, fast, naive))
    print(f"seam ratio (border/other cell-border gradient energy): untiled {r_ref:.3f}, exact {r_exact:.3f}, "
          f"fast {r_fast:.3f}, naive per-tile {r_naive:.3f}")
    assert abs(r_exact - r_ref) < 0.01 and r_fast < 1.1 * r_ref
    assert r_naive > 1.3  # the metric does see seams


# ---------------------------------------------------------------- fast mode

def test_fast_mode_is_exact_when_the_estimate_sees_the_whole_map(narrow):
    z = latent(24, 30)  # mid-block output fits the estimation mosaic: the statistics are exact
    with torch.inference_mode():
        assert max_diff(decode_tiled(narrow, z, TileOptions(48, "fast")), narrow.decode(z)) <= TOL
        x = image(96, 120)
        assert max_diff(encode_tiled(narrow, x, TileOptions(48, "fast")).mean, narrow.encode(x).mean) <= TOL


def test_fast_mode_error_is_measured(narrow):
    """Reported, not asserted exact: only that it stays a small fraction of the signal."""
    z, x = latent(49, 65), image(196, 260)
    with torch.inference_mode():
        ref_d, ref_e = narrow.decode(z), narrow.encode(x).mean
        out_d = decode_tiled(narrow, z, TileOptions(128, "fast"))
        out_e = encode_tiled(narrow, x, TileOptions(128, "fast")).mean
    for what, out, ref in (("decode", out_d, ref_d), ("encode", out_e, ref_e)):
        err = (out - ref).abs()
        print(f"fast {what}: max|Δ| {err.max():.3g}, mean|Δ| {err.mean():.3g}, mean|ref| {ref.abs().mean():.3g}")
        assert torch.isfinite(out).all() and err.mean() < 0.1 * ref.abs().mean()


# ---------------------------------------------------------------- the VAE wrapper and its fallback

def test_out_of_memory_falls_back_to_tiled_with_a_message(narrow, monkeypatch, caplog):
    wrapper = VAE(narrow, NARROW, torch.device("cpu"), torch.float32)
    z = latent(20, 28)
    ref = wrapper.decode(z)

    def oom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(narrow, "decode", oom)
    monkeypatch.setattr(narrow, "encode", oom)
    with caplog.at_level(logging.WARNING):
        out = wrapper.decode(z)
        lat = wrapper.encode(ref)
    assert max_diff(out, ref) <= TOL
    assert lat.shape == z.shape
    assert "ran out of memory; retrying tiled" in caplog.text


def test_other_errors_are_not_swallowed(narrow, monkeypatch):
    wrapper = VAE(narrow, NARROW, torch.device("cpu"), torch.float32)

    def broken(*_):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(narrow, "decode", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        wrapper.decode(latent(4, 4))


def test_bad_arguments_say_what_to_do(narrow):
    with pytest.raises(TilingError, match="mode"):
        TileOptions(128, "blurry")  # type: ignore[arg-type]
    with pytest.raises(TilingError, match="tile size"):
        TileOptions(5)
    with pytest.raises(TilingError, match="park must be a device"):
        TileOptions(128, park="ram")
    with pytest.raises(TilingError, match="divisible by 4"):
        encode_tiled(narrow, torch.zeros(1, 3, 30, 32))
    with pytest.raises(TilingError, match="latent must be"):
        decode_tiled(narrow, torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- nodes, ComfyUI's core ids headless

def test_core_tiled_nodes_run_headless_in_exact_mode(narrow):
    from ldm_nodes.registry import headless_registry

    reg = headless_registry()
    wrapper = VAE(narrow, NARROW, torch.device("cpu"), torch.float32)
    z = latent(20, 28)
    dec = reg["VAEDecodeTiled"]
    assert [i.name for i in dec.inputs] == ["samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert dec.input("tile_size").default == 512 and dec.input("tile_size").min == 64
    (img,) = dec.run(None, samples={"samples": z}, vae=wrapper, tile_size=64, overlap=64, temporal_size=64,
                     temporal_overlap=8)
    assert max_diff(img, wrapper.decode(z)) <= TOL
    (lat,) = reg["VAEEncodeTiled"].run(None, pixels=img, vae=wrapper, tile_size=64, overlap=0, temporal_size=64,
                                        temporal_overlap=8)
    assert max_diff(lat["samples"], wrapper.encode(img)) <= TOL
    ours = reg["LDMVAEDecodeTiled"]
    assert ours.input("mode").choices == ("exact", "fast") and ours.input("mode").default == "exact"
    (fast,) = ours.run(None, samples={"samples": z}, vae=wrapper, tile_size=64, mode="fast")
    assert fast.shape == img.shape
