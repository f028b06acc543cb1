"""Weights kept in their stored dtype, computed in fp32: an fp16 file loaded that way computes
exactly (torch.equal) what the same file converted to fp32 at load computes — UNet, VAE (plain
and tiled), text encoder and a LoRA-patched UNet — in half the weight memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.loading.loader import load_checkpoint
from ldm_core.lora.lora_names import random_lora, save_lora
from ldm_core.lora.weight_patch import apply_lora
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.networks.weight_cast import CastConv2d, CastLinear, compute_in, computing_in, storage_dtype, stored_bytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same fp16 SD1-layout file loaded twice: kept in fp16 ("auto") and converted to fp32."""
    path = save_checkpoint(shrink(PRESETS["sd1"]), tmp_path_factory.mktemp("ck") / "half.safetensors", seed=3,
                           dtype=torch.float16)
    return load_checkpoint(path, device="cpu"), load_checkpoint(path, device="cpu", weight_dtype="fp32"), path


def test_auto_keeps_the_files_fp16_and_computes_in_fp32(pair):
    kept, converted, _ = pair
    assert {p.dtype for p in kept.model.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in converted.model.unet.parameters()} == {torch.float32}
    assert kept.model.dtype == converted.model.dtype == torch.float32
    assert stored_bytes(kept.model.unet) * 2 == stored_bytes(converted.model.unet)
    assert isinstance(kept.model.unet.time_embed[0], CastLinear) and isinstance(kept.vae.model.encoder.conv_in,
                                                                                 CastConv2d)
    assert type(converted.model.unet.time_embed[0]) is nn.Linear  # same dtype: the plain layer, no cast


def test_unet_outputs_are_identical(pair):
    kept, converted, _ = pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, kept.config.unet.context_dim, generator=g)
    with torch.inference_mode():
        assert torch.equal(kept.model.unet(x, t, context), converted.model.unet(x, t, context))


def test_vae_outputs_are_identical_plain_and_tiled(pair):
    kept, converted, _ = pair
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 12, 12, generator=g)
    image = torch.rand(1, 48, 48, 3, generator=g)
    assert torch.equal(kept.vae.decode(latent), converted.vae.decode(latent))
    assert torch.equal(kept.vae.encode(image), converted.vae.encode(image))
    assert torch.equal(kept.vae.decode_tiled(latent, tile=64), converted.vae.decode_tiled(latent, tile=64))
    assert torch.equal(kept.vae.encode_tiled(image, tile=32), converted.vae.encode_tiled(image, tile=32))


def test_text_encoder_outputs_are_identical(pair):
    kept, converted, _ = pair
    a, b = kept.text_encoder.encode("a (red:1.2) circle"), converted.text_encoder.encode("a (red:1.2) circle")
    assert torch.equal(a.context, b.context)


def test_lora_patched_unet_is_identical(pair, tmp_path):
    kept, converted, _ = pair
    lora = save_lora(random_lora(kept.config, rank=4, seed=2, text=False), tmp_path / "l.safetensors")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t, context = torch.tensor([300.0]), torch.randn(1, 77, kept.config.unet.context_dim)
    outs = []
    for ck in (kept, converted):
        model = apply_lora(ck.model, None, lora, 0.8, 0.0).model
        with torch.inference_mode(), model.weights_applied() as unet:
            outs.append(unet(x, t, context))
    assert torch.equal(outs[0], outs[1])
    assert {p.dtype for p in kept.model.unet.parameters()} == {torch.float16}  # the shared UNet is unchanged


def test_forced_storage_dtype_and_the_rule_for_auto():
    half, full = {"a": torch.zeros(2, dtype=torch.float16)}, {"a": torch.zeros(2)}
    mixed = {**half, "b": torch.zeros(2)}
    assert storage_dtype(half, torch.float32) == torch.float16  # the file's
    assert storage_dtype(full, torch.float16) == torch.float16  # never wider than computed
    assert storage_dtype(mixed, torch.float32) == torch.float32  # mixed: the compute dtype
    assert storage_dtype(half, torch.float32, torch.bfloat16) == torch.bfloat16  # forced


def test_compute_in_swaps_classes_back_and_forth():
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4)).half()
    x = torch.randn(5, 3)
    compute_in(model, torch.float32)
    assert isinstance(model[0], CastLinear) and model[0].weight.dtype == torch.float16
    y = model[0](x)
    assert y.dtype == torch.float32 and torch.equal(y, nn.functional.linear(x, model[0].weight.float(),
                                                                             model[0].bias.float()))
    with computing_in(model, torch.float16, restore=torch.float32):
        assert type(model[0]) is nn.Linear  # stored and computed in fp16: the plain layer
    assert isinstance(model[0], CastLinear)


def test_a_conversion_larger_than_free_ram_is_a_typed_error_before_allocating(pair, monkeypatch):
    from ldm_core.errors import MemoryBudgetError
    from ldm_core.loading import loader

    _, _, path = pair
    monkeypatch.setattr(loader, "available_ram", lambda: 1000)  # bytes
    with pytest.raises(MemoryBudgetError, match=r"converting its weights to float32 needs .* GiB.*weight_dtype auto"):
        load_checkpoint(path, device="cpu", weight_dtype="fp32")
    load_checkpoint(path, device="cpu")  # as stored: mapped from the file, nothing to copy, no error
