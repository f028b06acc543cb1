"""AutoencoderKL: checkpoint-key parity and output parity against diffusers on identical weights.

Tiny same-layout configs (`shrink`) on CPU fp32; the full SD layout is checked on the
meta device only (no forward pass).
"""
from __future__ import annotations

import pytest
import torch

from ldm_core.errors import StateDictMismatchError
from ldm_core.networks.autoencoder_kl import AutoencoderKL, DiagonalGaussian, attention_weights_as_conv
from ldm_core.networks.config import VAEConfig
from ldm_core.networks.presets import PRESETS, shrink

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TOL = 1e-4  # max |ours - ref| / max |ref|
SMALL = shrink(PRESETS["sd1"]).vae
ATTN_WEIGHTS = [f"{side}.mid.attn_1.{n}.weight" for side in ("encoder", "decoder") for n in ("q", "k", "v", "proj_out")]


def diffusers_config(config: VAEConfig) -> dict:
    assert config.embed_dim == config.z_channels, "diffusers ties embed_dim to latent_channels"
    n = len(config.ch_mult)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
    }


def to_diffusers(sd: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    prefixed = {f"first_stage_model.{k}": v for k, v in sd.items()}
    return convert_ldm_vae_checkpoint(prefixed, diffusers_config(config))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: every parameter differs from its default init, activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # conv weight: variance-preserving
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderKL, torch.nn.Module]:
    ours = randomize(AutoencoderKL(SMALL)).eval()
    ref = diffusers.AutoencoderKL(**diffusers_config(SMALL)).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict(), SMALL), strict=True)
    return ours, ref


def test_keys_convert_to_diffusers_and_tensors_are_equal() -> None:
    ours = randomize(AutoencoderKL(SMALL))
    sd = ours.state_dict()
    converted = to_diffusers(sd, SMALL)
    ref = diffusers.AutoencoderKL(**diffusers_config(SMALL))
    ref.load_state_dict(converted, strict=True)  # raises on any missing/unexpected key or shape
    ref_sd = ref.state_dict()
    assert len(converted) == len(sd) == len(ref_sd)
    # Every one of our tensors appears, value for value, under exactly one diffusers key
    # (random values make each tensor's bytes unique; attention weights differ only in shape).
    by_bytes = {v.contiguous().numpy().tobytes(): k for k, v in ref_sd.items()}
    assert len(by_bytes) == len(ref_sd)
    matched = {by_bytes.get(w.contiguous().numpy().tobytes(), key) for key, w in sd.items()}
    assert matched == set(ref_sd)
    for key, w in sd.items():
        ref_w = ref_sd[by_bytes[w.contiguous().numpy().tobytes()]]
        assert torch.equal(ref_w.reshape(w.shape), w), key


@pytest.mark.parametrize("shape", [(2, 3, 64, 48), (1, 3, 40, 72), (1, 3, 30, 44)])
def test_encode_matches_diffusers(pair, shape) -> None:
    ours, ref = pair
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        post = ours.encode(x)
        ref_post = ref.encode(x).latent_dist
    f = SMALL.downsample_factor
    assert post.mean.shape == (shape[0], SMALL.embed_dim, shape[2] // f, shape[3] // f)
    assert rel_err(post.mean, ref_post.mean) <= TOL
    assert rel_err(post.logvar, ref_post.logvar) <= TOL
    assert torch.equal(post.mode(), post.mean)


@pytest.mark.parametrize("shape", [(2, 4, 8, 6), (1, 4, 5, 9), (1, 4, 3, 4)])
def test_decode_matches_diffusers(pair, shape) -> None:
    ours, ref = pair
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        image = ours.decode(z)
        ref_image = ref.decode(z).sample
    f = SMALL.downsample_factor
    assert image.shape == (shape[0], SMALL.out_channels, shape[2] * f, shape[3] * f)
    assert rel_err(image, ref_image) <= TOL


@pytest.mark.parametrize("ch_mult", [(1,), (1, 2), (1, 2, 2, 2, 4)])
def test_any_downsampling_factor_matches_diffusers(ch_mult) -> None:
    config = VAEConfig(ch=32, ch_mult=ch_mult, num_res_blocks=1)
    ours = randomize(AutoencoderKL(config), seed=3).eval()
    ref = diffusers.AutoencoderKL(**diffusers_config(config)).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict(), config), strict=True)
    x = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.inference_mode():
        mean = ours.encode(x).mean
        assert mean.shape[-2:] == (48 // config.downsample_factor, 32 // config.downsample_factor)
        assert rel_err(mean, ref.encode(x).latent_dist.mean) <= TOL
        assert rel_err(ours.decode(mean), ref.decode(mean).sample) <= TOL


def test_channels_last_matches_contiguous(pair) -> None:
    """channels_last (less memory on CPU) is a call-site choice; the result must not change."""
    ours, _ = pair
    fast = randomize(AutoencoderKL(SMALL)).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(9)) * 2 - 1
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        assert rel_err(fast.encode(x).mean, ours.encode(x).mean) <= TOL
        assert rel_err(fast.decode(z), ours.decode(z)) <= TOL


def test_sample_uses_the_given_generator(pair) -> None:
    ours, ref = pair
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.inference_mode():
        post = ours.encode(x)
        ref_post = ref.encode(x).latent_dist
    sample = post.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sample, post.mean + post.std * noise)
    assert rel_err(sample, ref_post.sample(torch.Generator().manual_seed(7))) <= TOL
    assert not torch.equal(sample, post.sample(torch.Generator().manual_seed(8)))


def test_posterior_clamps_logvar() -> None:
    logvar = torch.tensor([-100.0, -1.0, 2.0, 100.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    moments = torch.cat([torch.zeros(1, 4, 2, 2), logvar], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar[0, :, 0, 0].tolist() == [-30.0, -1.0, 2.0, 20.0]
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    torch.testing.assert_close(post.var, post.std**2)


def test_full_sd_layout_matches_diffusers_without_a_forward_pass() -> None:
    config = PRESETS["sd1"].vae
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        ref = diffusers.AutoencoderKL(**diffusers_config(config))
    sd = ours.state_dict()
    assert len(sd) == 248  # first_stage_model.* keys of an SD1.5 checkpoint
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    converted = to_diffusers(sd, config)
    ref_sd = ref.state_dict()
    assert len(ref_sd) == 248
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_linear_shaped_attention_weights_load_and_agree(pair) -> None:
    ours, _ = pair
    conv_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    linear_sd = dict(conv_sd)
    for key in ATTN_WEIGHTS:
        linear_sd[key] = conv_sd[key][:, :, 0, 0]
    assert linear_sd["decoder.mid.attn_1.proj_out.weight"].ndim == 2
    assert set(attention_weights_as_conv(linear_sd)) == set(linear_sd)
    from_conv = AutoencoderKL.from_state_dict(SMALL, conv_sd)
    from_linear = AutoencoderKL.from_state_dict(SMALL, linear_sd)
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(6))
    x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(from_conv.decode(z), from_linear.decode(z))
        assert torch.equal(from_conv.encode(x).mean, from_linear.encode(x).mean)
        assert torch.equal(from_conv.decode(z), ours.decode(z))


def test_from_state_dict_builds_on_meta_and_takes_the_tensors() -> None:
    sd = AutoencoderKL(SMALL).state_dict()
    model = AutoencoderKL.from_state_dict(SMALL, sd)
    assert not any(p.is_meta for p in model.parameters())
    assert model.decoder.conv_out.weight.data_ptr() == sd["decoder.conv_out.weight"].data_ptr()  # assign, no copy
    assert not model.training
    half = AutoencoderKL.from_state_dict(SMALL, {k: v.half() for k, v in sd.items()})
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    cast = AutoencoderKL.from_state_dict(SMALL, sd, dtype=torch.bfloat16)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda sd: sd.pop("decoder.up.2.upsample.conv.bias"), "decoder.up.2.upsample.conv.bias"),
        (lambda sd: sd.__setitem__("loss.logvar", torch.zeros(())), "loss.logvar"),
        (lambda sd: sd.__setitem__("encoder.down.1.block.0.nin_shortcut.weight", torch.zeros(64, 33, 1, 1)),
         "encoder.down.1.block.0.nin_shortcut.weight"),
        (lambda sd: sd.__setitem__("encoder.mid.attn_1.k.weight", torch.zeros(128, 64)), "encoder.mid.attn_1.k.weight"),
    ],
    ids=["missing", "unexpected", "wrong-shape", "wrong-shape-linear"],
)
def test_strict_loading_names_the_key(edit, key) -> None:
    sd = dict(AutoencoderKL(SMALL).state_dict())
    edit(sd)
    with pytest.raises(StateDictMismatchError, match=key.replace(".", r"\.")):
        AutoencoderKL.from_state_dict(SMALL, sd)
