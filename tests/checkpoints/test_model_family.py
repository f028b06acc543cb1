"""Architecture detection on generated real-layout checkpoints, and the refusal of bad files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm_core.checkpoints.model_family import CONFIG_METADATA_KEY, detect_config
from ldm_core.checkpoints.synthetic import checkpoint_tensors, save_checkpoint
from ldm_core.checkpoints.weights_file import read_weights
from ldm_core.errors import UnsupportedModelError, WrongComponentError
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.clip_text import ClipTextEncoder
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.networks.unet import UNetModel

FAMILIES = ["sd1", "sd1_inpaint", "sd2", "sd2_inpaint", "sdxl", "sdxl_refiner"]


@pytest.fixture(scope="module")
def tensors_by_family():
    return {name: checkpoint_tensors(shrink(PRESETS[name]), seed=3) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_detects_each_family_exactly(tensors_by_family, name):
    assert detect_config(tensors_by_family[name]) == shrink(PRESETS[name])


def test_v_prediction_marker_and_override(tensors_by_family):
    t = dict(tensors_by_family["sd2"])
    assert detect_config(t).prediction == "eps"
    assert detect_config(t, prediction="v") == shrink(PRESETS["sd2_v"])
    t["v_pred"] = torch.tensor([])
    assert detect_config(t) == shrink(PRESETS["sd2_v"])
    assert detect_config(t, prediction="eps").prediction == "eps"
    assert detect_config(tensors_by_family["sdxl"], {"modelspec.prediction_type": "v"}).prediction == "v"


def test_sd2_768_v_heuristic_on_output_norm_bias(tensors_by_family):
    t = dict(tensors_by_family["sd2"])
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    t[key] = torch.randn(t[key].shape, generator=torch.Generator().manual_seed(0))  # std ≈ 1 > 0.09
    assert detect_config(t).family == "sd2_v"


def test_embedded_config_metadata_wins(tensors_by_family):
    custom = shrink(PRESETS["sd1"]).replace(family="custom-tiny", latent_scale=0.5)
    assert detect_config(tensors_by_family["sd1"], {CONFIG_METADATA_KEY: custom.to_json()}) == custom
    with pytest.raises(UnsupportedModelError, match="metadata is invalid"):
        detect_config(tensors_by_family["sd1"], {CONFIG_METADATA_KEY: json.dumps({"family": 1})})


def test_standalone_vae_file_is_named_as_such():
    vae = AutoencoderKL(shrink(PRESETS["sd1"]).vae).state_dict()
    with pytest.raises(WrongComponentError, match="standalone VAE"):
        detect_config(vae)


def test_unknown_model_error_says_what_was_found_and_what_is_supported(tensors_by_family):
    with pytest.raises(UnsupportedModelError, match=r"no diffusion UNet found.*lm_head.*Supported families"):
        detect_config({"lm_head.weight": torch.zeros(2, 2), "lm_head.bias": torch.zeros(2)})
    # a UNet of a layout no preset has (3 levels, 1 res block) is refused with its shape summary
    odd = shrink(PRESETS["sd1"]).unet.replace(channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), num_res_blocks=1)
    sd = {f"model.diffusion_model.{k}": v for k, v in UNetModel(odd).state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"channel_mult=\(1, 2, 2\).*Supported families"):
        detect_config(sd)


def test_full_size_sd15_layout_key_sets_without_forward():
    """The full-size SD1.5 single file: 686 UNet + 248 VAE + 196 CLIP-L keys (+ position_ids)."""
    cfg = PRESETS["sd1"]
    with torch.device("meta"):
        unet = UNetModel(cfg.unet).state_dict()
        vae = AutoencoderKL(cfg.vae).state_dict()
        clip = ClipTextEncoder(cfg.text_encoders[0]).state_dict()
    assert (len(unet), len(vae), len(clip)) == (686, 248, 196)
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    tensors |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    tensors |= {f"cond_stage_model.transformer.{k}": v for k, v in clip.items()}
    assert detect_config(tensors) == cfg  # detection on shapes alone, no data read
    # Well-known full-size shapes of the released file.
    assert unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert unet["middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert vae["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert clip["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)


def test_detect_reads_file_metadata_roundtrip(tmp_path):
    cfg = shrink(PRESETS["sd1"])
    p = save_checkpoint(cfg, tmp_path / "m.safetensors", embed_config=True, dtype=torch.float16)
    wf = read_weights(p)
    assert detect_config(wf.tensors, wf.metadata) == cfg
    save_file({"x": torch.zeros(1)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(UnsupportedModelError):
        detect_config(read_weights(tmp_path / "junk.safetensors").tensors)
