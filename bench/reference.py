"""The reference implementations, built offline on the same weights as ours.

diffusers `UNet2DConditionModel` / `AutoencoderKL` and transformers `CLIPTextModel`,
configured from our `ModelConfig` (so `--quick` narrow weights work too), weights taken
from the checkpoint file through diffusers' own single-file converters. A local
diffusers pipeline folder (model_index.json, each component's config, the CLIP tokenizer
files) lets `from_single_file` run with `local_files_only=True`: nothing is fetched.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_core.checkpoints.weights_file import TEXT_ENCODER_PREFIXES
from ldm_core.networks.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm_core.networks.presets import ADM_FOURIER_DIM
from ldm_core.text.tokenizer import ClipTokenizer

SD1_TEXT_PREFIX = TEXT_ENCODER_PREFIXES[0]  # cond_stage_model.transformer.


class ReferenceError(RuntimeError):
    """A reference model could not be built from our weights (a converter or config mismatch)."""


def unet_config(u: UNetConfig, sample_size: int = 64) -> dict:
    """The UNet2DConditionModel config of the same architecture as `u`."""
    levels = range(len(u.channel_mult))
    widths = [u.model_channels * m for m in u.channel_mult]
    attn = [u.transformer_depth[i] > 0 for i in levels]
    if u.num_head_channels == -1:
        heads: int | list[int] = u.num_heads  # diffusers calls the head count "attention_head_dim"
    else:
        heads = [w // u.num_head_channels for w in widths]
    # diffusers' middle block takes the depth of the last level; levels without
    # attention ignore theirs, so give them the middle depth.
    depths = [d if d > 0 else max(u.transformer_depth_middle, 1) for d in u.transformer_depth]
    if u.transformer_depth_middle >= 0:
        assert depths[-1] == u.transformer_depth_middle, "diffusers cannot express this middle depth"
    mid = {-1: "UNetMidBlock2D"}.get(u.transformer_depth_middle, "UNetMidBlock2DCrossAttn")
    cfg = dict(
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        block_out_channels=widths,
        layers_per_block=u.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type=None if u.transformer_depth_middle < -1 else mid,
        cross_attention_dim=u.context_dim,
        attention_head_dim=heads,
        transformer_layers_per_block=depths,
        use_linear_projection=u.use_linear_in_transformer,
        norm_num_groups=u.norm_groups,
        sample_size=sample_size,
    )
    if u.adm_in_channels is not None:
        cfg.update(
            addition_embed_type="text_time", addition_time_embed_dim=ADM_FOURIER_DIM,
            projection_class_embeddings_input_dim=u.adm_in_channels,
        )
    if u.num_classes is not None:
        cfg.update(num_class_embeds=u.num_classes)
    return cfg


def vae_config(v: VAEConfig, latent_scale: float) -> dict:
    n = len(v.ch_mult)
    return dict(
        in_channels=v.in_channels,
        out_channels=v.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[v.ch * m for m in v.ch_mult],
        layers_per_block=v.num_res_blocks,
        act_fn="silu",
        latent_channels=v.z_channels,
        norm_num_groups=v.norm_groups,
        sample_size=512,
        scaling_factor=latent_scale,
    )


def clip_config(c: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=c.max_positions,
        hidden_act=c.hidden_act, projection_dim=c.projection_dim or c.hidden_size,
        bos_token_id=ClipTokenizer.bos, eos_token_id=ClipTokenizer.eos, pad_token_id=ClipTokenizer.eos,
    )


def _assign(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Take `sd`'s tensors in place of a meta-built model's (no copy: the file's mmapped views)."""
    result = model.load_state_dict(dict(sd), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ReferenceError(f"{what}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ReferenceError(f"{what}: still on the meta device after loading: {on_meta[:5]}")
    return model.eval().requires_grad_(False)


def build_unet(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> UNet2DConditionModel:
    """diffusers UNet holding the file's UNet weights. `tensors`: the whole file, original keys."""
    cfg = unet_config(config.unet)
    sd = convert_ldm_unet_checkpoint(dict(tensors), cfg)
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    return _assign(model, sd, "diffusers UNet")


def build_vae(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    cfg = vae_config(config.vae, config.latent_scale)
    sd = convert_ldm_vae_checkpoint(dict(tensors), cfg)
    with torch.device("meta"):
        model = AutoencoderKL(**cfg)
    return _assign(model, sd, "diffusers AutoencoderKL")


def build_text_model(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    """transformers CLIPTextModel (SD1 CLIP-L file keys `cond_stage_model.transformer.text_model.*`)."""
    if len(config.text_encoders) != 1 or config.text_encoders[0].key_format != "hf":
        raise ReferenceError("the text-encoder reference covers SD1.x (one CLIP-L with transformers keys) only")
    full = SD1_TEXT_PREFIX + "text_model."
    sd = {k[len(full):]: v for k, v in tensors.items() if k.startswith(full)}
    with torch.device("meta"):
        model = CLIPTextModel(clip_config(config.text_encoders[0]))
    if hasattr(model, "text_model"):  # transformers < 5.6 nests the modules one level deeper
        sd = {"text_model." + k: v for k, v in sd.items()}
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    # position_ids is a non-persistent buffer: no file holds it, the meta build left it empty.
    embeddings.position_ids = torch.arange(config.text_encoders[0].max_positions)[None]
    return _assign(model, sd, "transformers CLIPTextModel")


def write_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, derived from ldm_core's BPE file."""
    folder.mkdir(parents=True, exist_ok=True)
    ours = ClipTokenizer()
    merges = sorted(ours.bpe_ranks, key=ours.bpe_ranks.__getitem__)
    (folder / "vocab.json").write_text(json.dumps(ours.encoder, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return folder


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def write_pipeline_folder(config: ModelConfig, folder: Path) -> Path:
    """A local diffusers StableDiffusionPipeline layout, configs only (no weights), for `from_single_file`.

    Kept between runs: model_index.json is written last, so its presence means complete.
    """
    if (folder / "model_index.json").is_file():
        return folder

    def dump(rel: str, d: dict) -> None:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(d, indent=1))

    dump("unet/config.json", {"_class_name": "UNet2DConditionModel", **unet_config(config.unet)})
    dump("vae/config.json", {"_class_name": "AutoencoderKL", **vae_config(config.vae, config.latent_scale)})
    te = clip_config(config.text_encoders[0]).to_dict()
    te["architectures"] = ["CLIPTextModel"]
    dump("text_encoder/config.json", te)
    s = config.schedule
    dump("scheduler/scheduler_config.json", {
        "_class_name": "PNDMScheduler", "beta_schedule": s.beta_schedule, "beta_start": s.linear_start,
        "beta_end": s.linear_end, "num_train_timesteps": s.timesteps, "skip_prk_steps": True,
        "steps_offset": 1, "set_alpha_to_one": False,
    })
    write_tokenizer(folder / "tokenizer")
    dump("model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    })
    return folder
