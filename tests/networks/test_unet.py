"""UNet: key layout and numerics against diffusers' UNet2DConditionModel.

Weights go from our state dict (prefixed `model.diffusion_model.`, as in a
single-file checkpoint) through diffusers' own single-file converter, so key parity
and output parity are both checked against an implementation we did not write.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm_core.errors import ConfigError, StateDictMismatchError
from ldm_core.networks.config import UNetConfig
from ldm_core.networks.presets import ADM_FOURIER_DIM, PRESETS, adm_scalars, shrink
from ldm_core.networks.unet import UNetModel, size_embedding, timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from bench.reference import unet_config as diffusers_config  # noqa: E402

PREFIX = "model.diffusion_model."
TOLERANCE = 1e-4  # max|ours - diffusers| / max|diffusers|


def to_diffusers(ours: UNetModel, cfg: dict) -> dict[str, torch.Tensor]:
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    return convert_ldm_unet_checkpoint(checkpoint, cfg)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter to small random normals (norm gains around 1), so no layer is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / math.sqrt(fan_in))


def test_timestep_embedding_known_values():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([freqs.cos(), freqs.sin()]))
    assert timestep_embedding(torch.tensor([3.0]), 7)[0, -1] == 0  # odd width: zero pad


def test_size_embedding_matches_diffusers_add_time_proj():
    from diffusers.models.embeddings import Timesteps

    values = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 32.0, 896.0, 1152.0]])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(values.flatten()).reshape(2, -1)
    ours = size_embedding(values)
    assert ours.shape == (2, 6 * 256)
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------------------
# Shrunk real-layout variants: key parity and output parity against diffusers.

VARIANTS = {
    # name: (our config, latent height, width)
    "sd1": (shrink(PRESETS["sd1"]).unet, 24, 16),
    "sd2_v": (shrink(PRESETS["sd2_v"]).unet, 16, 16),
    "sd1_inpaint": (shrink(PRESETS["sd1_inpaint"]).unet, 20, 12),  # odd sizes deeper down: 5x3 -> 3x2
    "sdxl": (shrink(PRESETS["sdxl"]).unet, 13, 11),
    "sdxl_refiner": (shrink(PRESETS["sdxl_refiner"]).unet, 24, 16),
    "class_conditional": (shrink(PRESETS["sd1"]).unet.replace(num_classes=10), 16, 16),
    "middle_resblock_only": (shrink(PRESETS["sdxl"]).unet.replace(transformer_depth_middle=-1), 16, 16),
    "no_middle_block": (shrink(PRESETS["sdxl"]).unet.replace(transformer_depth_middle=-2), 16, 16),
}
FAMILY = {"sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner", "middle_resblock_only": "sdxl", "no_middle_block": "sdxl"}

_pairs: dict[str, tuple[UNetModel, UNet2DConditionModel, dict]] = {}


def pair(name: str) -> tuple[UNetModel, UNet2DConditionModel, dict[str, torch.Tensor]]:
    """(ours with random weights, diffusers loaded from ours through its converter, converted dict)."""
    if name not in _pairs:
        config = VARIANTS[name][0]
        ours = UNetModel(config).eval()
        randomize_(ours, seed=list(VARIANTS).index(name))
        cfg = diffusers_config(config)
        converted = to_diffusers(ours, cfg)
        ref = UNet2DConditionModel(**cfg).eval()
        ref.load_state_dict(converted, strict=True)
        _pairs[name] = (ours, ref, converted)
    return _pairs[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keys_convert_onto_diffusers_one_to_one(name):
    ours, ref, converted = pair(name)
    own = ours.state_dict()
    # strict load above: the converted keys are exactly diffusers' keys. Here: every one
    # of ours is used once, and each arrives unchanged.
    assert len(converted) == len(own) == len(ref.state_dict())
    assert {v.data_ptr() for v in converted.values()} == {v.data_ptr() for v in own.values()}
    theirs = ref.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in converted.items())


def _inputs(name: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(context, y for ours, extra kwargs for diffusers)."""
    config, _, _ = VARIANTS[name]
    g = torch.Generator().manual_seed(7)
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    if config.num_classes is not None:
        labels = torch.tensor([3, 8])
        return context, labels, {"class_labels": labels}
    if config.adm_in_channels is None:
        return context, None, {}
    n = adm_scalars(PRESETS[FAMILY[name]])
    pooled = torch.randn(batch, config.adm_in_channels - n * ADM_FOURIER_DIM, generator=g)
    sizes = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 32.0, 896.0, 1152.0]])
    if n == 5:  # refiner: h, w, crop top, left, aesthetic score
        sizes = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 1344.0, 16.0, 32.0, 2.5]])
    y = torch.cat([pooled, size_embedding(sizes)], dim=1)
    return context, y, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_matches_diffusers(name, record_property):
    ours, ref, _ = pair(name)
    config, h, w = VARIANTS[name]
    x = torch.randn(2, config.in_channels, h, w, generator=torch.Generator().manual_seed(3))
    context, y, extra = _inputs(name)
    worst = 0.0
    with torch.inference_mode():
        for timesteps in (torch.tensor([10.0, 700.0]), torch.tensor([999.0, 0.0])):
            expected = ref(x, timesteps, context, **extra).sample
            got = ours(x, timesteps, context, y)
            assert got.shape == expected.shape == (2, config.out_channels, h, w)
            scale = expected.abs().max().item()
            assert scale > 1e-2 and not torch.allclose(expected[0], expected[1])  # not a vacuous comparison
            worst = max(worst, (got - expected).abs().max().item() / scale)
    print(f"{name}: max|ours - diffusers| / max|diffusers| = {worst:.2e}")
    record_property("relative_error", worst)
    assert worst <= TOLERANCE


def test_middle_block_numbering():
    keys = lambda name: {k.split(".")[1] for k in pair(name)[0].state_dict() if k.startswith("middle_block.")}
    assert keys("sdxl") == {"0", "1", "2"}
    assert keys("middle_resblock_only") == {"0"}  # SSD-1B / Segmind Vega layout
    assert keys("no_middle_block") == set()  # KOALA / SD-XS layout


def test_y_is_required_exactly_when_the_model_has_a_label_embedding():
    ours, _, _ = pair("sdxl")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="needs y"):
        ours(x, t, torch.randn(1, 3, VARIANTS["sdxl"][0].context_dim))
    plain, _, _ = pair("sd1")
    with pytest.raises(ValueError, match="no class/ADM"):
        plain(x, t, torch.randn(1, 3, VARIANTS["sd1"][0].context_dim), torch.zeros(1, 5))


# ---------------------------------------------------------------------------
# Full-size layouts, on the meta device (no memory, no forward).

# UNet2DConditionModel's defaults are SD1.x's but for the context width (1280 there).
SD15_DIFFUSERS = dict(cross_attention_dim=768)
SDXL_BASE_DIFFUSERS = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.mark.parametrize(
    ("name", "diffusers_kwargs", "n_keys"),
    [("sd1", SD15_DIFFUSERS, 686), ("sdxl", SDXL_BASE_DIFFUSERS, 1680)],
)
def test_full_size_layout_matches_diffusers(name, diffusers_kwargs, n_keys):
    with torch.device("meta"):
        ours = UNetModel(PRESETS[name].unet)
        ref = UNet2DConditionModel(**diffusers_kwargs)
    own = ours.state_dict()
    assert len(own) == n_keys
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in own.items()}, dict(ref.config))
    theirs = ref.state_dict()
    assert converted.keys() == theirs.keys()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}


# ---------------------------------------------------------------------------
# Loading.

def _small_sd() -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    ours, _, _ = pair("sd1")
    return VARIANTS["sd1"][0], {k: v.clone() for k, v in ours.state_dict().items()}


def test_from_state_dict_reproduces_the_model():
    config, sd = _small_sd()
    loaded = UNetModel.from_state_dict(config, sd)
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([5.0])
    context = torch.randn(1, 4, config.context_dim)
    with torch.inference_mode():
        assert torch.equal(loaded(x, t, context), pair("sd1")[0](x, t, context))


def test_from_state_dict_dtype():
    config, sd = _small_sd()
    half = {k: v.half() for k, v in sd.items()}
    assert UNetModel.from_state_dict(config, half).dtype == torch.float16  # file's dtype kept
    assert UNetModel.from_state_dict(config, half, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_strict_loading_names_the_bad_key(damage):
    config, sd = _small_sd()
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if damage == "missing":
        del sd[key]
    elif damage == "extra":
        key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.bias"
        sd[key] = torch.zeros(1)
    else:
        sd[key] = torch.zeros(3, 3)
    with pytest.raises(StateDictMismatchError, match=key.replace(".", r"\.")):
        UNetModel.from_state_dict(config, sd)


# ---------------------------------------------------------------------------
# The convolution fast paths against torch's own convolution.

@pytest.fixture
def patch_path_everywhere(monkeypatch):
    """Send every eligible 3x3 convolution through the unfold-and-multiply path."""
    from ldm_core.networks import unet

    monkeypatch.setattr(unet, "LARGE_WEIGHT", 0)
    monkeypatch.setattr(unet, "SMALL_MAP_POSITIONS", 1 << 30)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv2d_patch_path_matches_torch(stride, size, channels_last, patch_path_everywhere):
    from ldm_core.networks.unet import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(24, 40, 3, stride=stride, padding=1)
    x = torch.randn(2, 24, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1)
    with torch.inference_mode():
        got = conv(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_output_matches_diffusers_with_the_patch_path(patch_path_everywhere):
    """Every 3x3 conv through the patch path (and, as weights count as large, plain upsampling)."""
    ours, ref, _ = pair("sd1")
    x = torch.randn(2, 4, 20, 12, generator=torch.Generator().manual_seed(3))
    context, _, _ = _inputs("sd1")
    t = torch.tensor([10.0, 700.0])
    with torch.inference_mode():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    assert (got - expected).abs().max().item() / expected.abs().max().item() <= TOLERANCE


def test_feed_forward_row_blocks_change_nothing(monkeypatch):
    from ldm_core.networks import attention

    ff = attention.FeedForward(16).eval()
    randomize_(ff, seed=5)
    x = torch.randn(2, 37, 16)
    with torch.inference_mode():
        whole = ff(x)
        monkeypatch.setattr(attention, "FEED_FORWARD_BLOCK_BYTES", 2 * 64 * 4 * 10)  # 10 rows a block
        blocked = ff(x)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [None, (10, 7)])  # None: exact doubling (sub-pixel path); else resize
def test_upsample_matches_interpolate_then_conv(size):
    from ldm_core.networks.unet import Upsample

    torch.manual_seed(0)
    up = Upsample(24)
    x = torch.randn(2, 24, 5, 4)
    target = size or (10, 8)
    upsampled = torch.nn.functional.interpolate(x, size=target, mode="nearest")
    expected = torch.nn.functional.conv2d(upsampled, up.conv.weight, up.conv.bias, padding=1)
    with torch.inference_mode():
        got = up(x, size)
    assert got.shape == (2, 24, *target)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch_path", [False, True])  # False: sub-pixel upsampling; True: patch convs
def test_gradients_flow_through_every_path(patch_path, request):
    """The in-place shortcuts keep autograd intact (fine-tuning, LoRA training)."""
    if patch_path:
        request.getfixturevalue("patch_path_everywhere")
    config, _, _ = VARIANTS["sd1"]
    model = UNetModel(config)
    out = model(torch.randn(1, 4, 16, 16), torch.tensor([3.0]), torch.randn(1, 5, config.context_dim))
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


CONTEXT_MAP_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                              transformer_depth_middle=0, context_dim=8, num_heads=-1, num_head_channels=16,
                              use_linear_in_transformer=True, norm_groups=8, context_map_grid=4, context_map_channels=3)


def test_context_map_starts_with_no_effect():
    """The zero-initialised projection: a UNet with the context map computes the plain UNet exactly."""
    torch.manual_seed(0)
    with_map = UNetModel(CONTEXT_MAP_UNET).eval()
    plain = UNetModel(CONTEXT_MAP_UNET.replace(context_map_grid=0)).eval()
    missing, unexpected = plain.load_state_dict(with_map.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("context_map.") for k in unexpected)
    x, t, ctx = torch.randn(2, 4, 12, 12), torch.tensor([10, 900]), torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(with_map(x, t, ctx), plain(x, t, ctx))


def test_gated_context_map_starts_as_the_mean_and_pools_by_its_gate():
    """The gate starts at zero: the mean over tokens (a UNet with it computes the ungated one, to
    rounding). A gate that scores one token far above the rest gives that token's own map; with any gate
    the map is invariant to the tokens' order and to repeating the context (batched guidance)."""
    from ldm_core.networks.unet import ContextMap

    torch.manual_seed(0)
    gated = UNetModel(CONTEXT_MAP_UNET.replace(context_map_gate=True)).eval()
    plain = UNetModel(CONTEXT_MAP_UNET).eval()
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and unexpected == ["context_map.gate.weight", "context_map.gate.bias"]
    with torch.no_grad():
        torch.nn.init.normal_(plain.context_map.proj.weight)
        gated.context_map.proj.weight.copy_(plain.context_map.proj.weight)
        x, t, ctx = torch.randn(2, 4, 12, 12), torch.tensor([10, 900]), torch.randn(2, 5, 8)
        torch.testing.assert_close(gated(x, t, ctx), plain(x, t, ctx), atol=1e-6, rtol=1e-6)

    m = ContextMap(context_dim=8, grid=4, channels=3, out_channels=3, gated=True)
    ctx = torch.randn(1, 6, 8)
    ctx[0, :, 0] = 0.0
    ctx[0, 2, 0] = 10.0  # token 2 alone has feature 0
    with torch.no_grad():
        m.gate.weight[:, 0] = 5.0  # every channel scores token 2 at 50, the rest at 0
        own = m.mlp(ctx[:, 2:3]).view(1, 3, 4, 4)
        torch.testing.assert_close(m.grid_map(ctx), own, atol=1e-6, rtol=1e-6)
        torch.nn.init.normal_(m.gate.weight)
        torch.nn.init.normal_(m.proj.weight)
        out = m(ctx, (8, 8))
        torch.testing.assert_close(m(ctx[:, torch.randperm(6)], (8, 8)), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(ctx.repeat(1, 3, 1), (8, 8)), out, atol=1e-5, rtol=1e-5)
        assert (m.grid_map(ctx) - m.mlp(ctx).mean(1).view(1, 3, 4, 4)).abs().max() > 1e-3  # no longer the mean
    with pytest.raises(ConfigError, match="context_map_gate"):
        CONTEXT_MAP_UNET.replace(context_map_grid=0, context_map_gate=True)


def test_context_map_known_answer_and_repeat_invariance():
    """A map that paints the top-left grid cell lands in the top-left of the latent; the mean over
    tokens makes a context repeated to a longer length (batched guidance) give the same output."""
    from ldm_core.networks.unet import ContextMap

    m = ContextMap(context_dim=8, grid=4, channels=3, out_channels=3)
    with torch.no_grad():
        m.mlp[2].weight.zero_()
        m.mlp[2].bias.zero_()
        m.mlp[2].bias.view(3, 4, 4)[1, 0, 0] = 2.0  # channel 1, top-left cell
        m.proj.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        out = m(torch.randn(1, 5, 8), (16, 16))
    cell = torch.zeros(1, 3, 4, 4)
    cell[0, 1, 0, 0] = 2.0
    expected = torch.nn.functional.interpolate(cell, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out[0, 1, :4, :4].mean() > 1.0 and out[0, 1, 8:, 8:].abs().max() == 0 and out[0, [0, 2]].abs().max() == 0

    torch.manual_seed(1)
    unet = UNetModel(CONTEXT_MAP_UNET).eval()
    with torch.no_grad():
        torch.nn.init.normal_(unet.context_map.proj.weight)
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 8)
        base = unet(x, t, ctx)
        assert (base - unet(x, t, torch.randn(1, 3, 8))).abs().max() > 1e-3  # the words now move the map
        assert torch.allclose(unet(x, t, ctx.repeat(1, 4, 1)), base, atol=1e-5)
