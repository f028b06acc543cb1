"""Loading generated real-layout checkpoints end to end, and the minimal txt2img chain."""
from __future__ import annotations

import pytest
import torch

from ldm_core.checkpoints.synthetic import checkpoint_tensors, save_checkpoint
from ldm_core.checkpoints.weights_file import read_weights
from ldm_core.errors import StateDictMismatchError, UnsupportedModelError, WrongComponentError
from ldm_core.loading.loader import load_checkpoint, load_diffusion_model, load_text_encoder, load_vae
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.pipeline.jobs import txt2img


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    return save_checkpoint(shrink(PRESETS["sd1"]), tmp_path_factory.mktemp("ck") / "sd1.safetensors", seed=5)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    return save_checkpoint(shrink(PRESETS["sdxl"]), tmp_path_factory.mktemp("ck") / "sdxl.safetensors", seed=6)


def test_load_sd1_is_strict_and_zero_copy(sd1_file):
    ck = load_checkpoint(sd1_file, device="cpu")
    assert ck.config == shrink(PRESETS["sd1"])
    assert ck.text_encoder is not None and ck.vae is not None
    wf = read_weights(sd1_file)
    for key in ("input_blocks.0.0.weight", "time_embed.0.weight"):
        assert torch.equal(ck.model.unet.state_dict()[key], wf.tensors["model.diffusion_model." + key])
    # fp32 file into an fp32 model: a linear weight is a view of the file mapping, not a copy
    # (conv weights are re-laid out channels_last by the UNet, a one-time copy that pays off per step)
    assert not ck.model.unet.state_dict()["time_embed.0.weight"].untyped_storage().resizable()
    assert not ck.vae.model.state_dict()["decoder.conv_in.bias"].untyped_storage().resizable()


def test_fp16_file_and_ckpt_give_the_same_model(tmp_path):
    cfg = shrink(PRESETS["sd2"])
    half = load_checkpoint(save_checkpoint(cfg, tmp_path / "h.safetensors", seed=1, dtype=torch.float16))
    pickle = load_checkpoint(save_checkpoint(cfg, tmp_path / "p.ckpt", seed=1))
    assert half.config == pickle.config == cfg
    a = half.model.unet.state_dict()["out.2.weight"]
    b = pickle.model.unet.state_dict()["out.2.weight"]
    # the fp16 file's weights stay fp16 (computed in fp32: networks/weight_cast.py), the same values
    assert a.dtype == torch.float16 and half.model.dtype == torch.float32
    assert torch.equal(a.float(), b.half().float())


def test_vae_file_as_checkpoint_and_standalone_vae(tmp_path):
    cfg = shrink(PRESETS["sd1"])
    tensors = checkpoint_tensors(cfg, text=False)
    from safetensors.torch import save_file

    vae_only = {k.removeprefix("first_stage_model."): v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    p = tmp_path / "vae.safetensors"
    save_file(vae_only, str(p))
    with pytest.raises(WrongComponentError, match="VAE loader"):
        load_checkpoint(p)
    vae = load_vae(p)
    assert vae.config == cfg.vae
    with pytest.raises(WrongComponentError, match="no VAE"):
        load_vae(save_checkpoint(cfg, tmp_path / "novae.safetensors", vae=False))


def test_mismatched_shape_names_the_key(tmp_path):
    cfg = shrink(PRESETS["sd1"])
    tensors = checkpoint_tensors(cfg)
    key = "first_stage_model.decoder.mid.block_1.conv1.bias"
    tensors[key] = torch.zeros(7)
    from safetensors.torch import save_file

    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p))
    with pytest.raises(StateDictMismatchError, match=r"VAE.*decoder\.mid\.block_1\.conv1\.bias"):
        load_checkpoint(p)
    del tensors[key]
    save_file(tensors, str(p))
    with pytest.raises(StateDictMismatchError, match=r"missing.*decoder\.mid\.block_1\.conv1\.bias"):
        load_checkpoint(p)


def test_standalone_unet_and_text_encoder_files(tmp_path):
    from safetensors.torch import save_file

    cfg = shrink(PRESETS["sdxl"])
    t = checkpoint_tensors(cfg, seed=2)
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in t.items() if k.startswith("model.diffusion_model.")}
    save_file(unet, str(tmp_path / "unet.safetensors"))
    with pytest.raises(UnsupportedModelError, match="family"):
        load_diffusion_model(tmp_path / "unet.safetensors")  # narrow context width: family must be given
    m = load_diffusion_model(tmp_path / "unet.safetensors", family="sdxl")
    assert m.config.unet == cfg.unet and m.config.latent_scale == 0.13025
    for i, prefix in enumerate(("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")):
        save_file({k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)}, str(tmp_path / f"te{i}.safetensors"))
    te = load_text_encoder([tmp_path / "te0.safetensors", tmp_path / "te1.safetensors"])
    assert [c.key_format for c in te.configs] == ["hf", "openclip"]
    assert te.encode("a cat").context.shape == (1, 77, cfg.unet.context_dim)


@pytest.mark.parametrize("fixture", ["sd1_file", "sdxl_file"])
def test_txt2img_end_to_end_is_deterministic(request, fixture):
    ck = load_checkpoint(request.getfixturevalue(fixture))
    kw = dict(width=64, height=48, steps=3, cfg=5.0)
    a = txt2img(ck, "a red circle", "blurry", seed=11, **kw)
    b = txt2img(ck, "a red circle", "blurry", seed=11, **kw)
    c = txt2img(ck, "a red circle", "blurry", seed=12, **kw)
    assert a.shape == (1, 48, 64, 3) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fp16_vae_overflow_is_redone_in_fp32(sd1_file):
    """An fp16 SD VAE overflows (inf → NaN → black image); decode must notice and redo in fp32."""
    vae32 = load_vae(sd1_file, dtype=torch.float32)
    vae16 = load_vae(sd1_file, dtype=torch.float16)
    # activations beyond fp16's 65504 after the first conv; the GroupNorm after it undoes the scale in fp32
    conv = vae16.model.decoder.conv_in
    conv.weight.data, conv.bias.data = conv.weight.data * 3e4, conv.bias.data * 3e4
    # the fp32 reference holds exactly the fp16 weights, so only the compute precision differs
    vae32.model.load_state_dict({k: v.float() for k, v in vae16.model.state_dict().items()})
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        raw16 = vae16.model.decode(z.half())
    assert not torch.isfinite(raw16).all()  # the hazard is real at this scale
    out16, out32 = vae16.decode(z), vae32.decode(z)
    assert torch.isfinite(out16).all()
    torch.testing.assert_close(out16, out32, atol=1e-5, rtol=1e-5)
    assert vae16.model.decoder.conv_in.weight.dtype == torch.float16  # the model stays as loaded


def test_device_and_precision_choice():
    from ldm_core.device import parse_dtype, pick_device, pick_precision
    from ldm_core.errors import DeviceError

    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            pick_device("cuda")
        assert pick_device().type in ("cpu", "mps")
    p = pick_precision(torch.device("cpu"))
    assert (p.unet, p.text, p.vae) == (torch.float32,) * 3
    g = pick_precision(torch.device("cuda"), vae="fp16")
    assert g.unet == torch.float16 and g.vae == torch.float16
    with pytest.raises(DeviceError, match="unknown precision"):
        parse_dtype("fp8")
