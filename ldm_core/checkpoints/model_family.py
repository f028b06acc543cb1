"""Architecture detection: from a checkpoint's key layout and tensor shapes to a ModelConfig.

The family (SD1.x, SD2.x, inpainting, SDXL base/refiner) is recognised by structure —
which component prefixes exist, the UNet's level/block/transformer layout, conv or
linear proj_in, label embedding — never by file name. Widths come from the shapes.
Two numbers no shape reveals come from the family: attention head width (SD1: 8 heads;
every other family: 64 channels per head, narrowed to gcd(width, 64) for the narrow
test models) and the text encoders' activation and layer choice.

A checkpoint may also carry its whole config as JSON in the safetensors metadata key
`ldm_core.config` (the project's own trained models do); that config is used as is,
after checking the weights against it at load time.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch

from ldm_core.checkpoints import weights_file as ckpt
from ldm_core.checkpoints.weights_file import Components, prefix_summary
from ldm_core.errors import ConfigError, UnsupportedModelError, WrongComponentError
from ldm_core.networks.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm_core.networks.presets import DESCRIPTIONS, PRESETS

CONFIG_METADATA_KEY = "ldm_core.config"
SUPPORTED = "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
# Known head width of the families whose UNet uses num_head_channels.
HEAD_CHANNELS = 64


def _count(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def detect_unet(sd: Mapping[str, torch.Tensor]) -> UNetConfig:
    """UNetConfig from the keys/shapes of a UNet state dict (prefix stripped)."""
    keys = set(sd)
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        out_conv = sd["out.2.weight"]
    except KeyError as e:
        raise UnsupportedModelError(f"UNet weights lack {e.args[0]!r}: not an LDM/SGM UNet") from None
    model_channels = conv_in.shape[0]
    n_inputs = _count(keys, r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]  # input block indices per level
    for i in range(1, n_inputs):
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
    channel_mult = tuple(sd[f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0] // model_channels for lv in levels)
    num_res_blocks = len(levels[0])
    depth = tuple(_count(keys, rf"input_blocks\.{lv[0]}\.1\.transformer_blocks\.(\d+)\.") for lv in levels)
    if "middle_block.1.in_layers.0.weight" in sd:
        depth_middle = -1
    else:
        depth_middle = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    to_k = next((sd[k] for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((sd[k] for k in sorted(keys) if k.endswith(".proj_in.weight")), None)
    adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    context_dim = None if to_k is None else to_k.shape[1]
    if context_dim == 768 or (context_dim is not None and proj_in is not None and proj_in.ndim == 4 and adm is None):
        heads = {"num_heads": 8, "num_head_channels": -1}  # SD1.x: 8 heads at every width
    else:
        heads = {"num_heads": -1, "num_head_channels": math.gcd(model_channels, HEAD_CHANNELS)}
    try:
        return UNetConfig(
            in_channels=conv_in.shape[1], out_channels=out_conv.shape[0], model_channels=model_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, transformer_depth=depth,
            transformer_depth_middle=depth_middle, context_dim=context_dim,
            use_linear_in_transformer=proj_in is not None and proj_in.ndim == 2,
            adm_in_channels=adm, num_classes=num_classes, **heads,
        )
    except ConfigError as e:
        raise UnsupportedModelError(f"UNet layout not understood: {e}") from None


def detect_vae(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """VAEConfig from an autoencoder state dict (prefix stripped)."""
    keys = set(sd)
    try:
        conv_in = sd["encoder.conv_in.weight"] if "encoder.conv_in.weight" in sd else None
        dec_in = sd["decoder.conv_in.weight"]
        dec_out = sd["decoder.conv_out.weight"]
    except KeyError as e:
        raise UnsupportedModelError(f"VAE weights lack {e.args[0]!r}: not an LDM AutoencoderKL") from None
    n_up = _count(keys, r"decoder\.up\.(\d+)\.")
    top = sd[f"decoder.up.{n_up - 1}.block.0.conv1.weight"].shape[1]  # decoder starts at the widest level
    ch = sd["decoder.up.0.block.0.conv2.weight"].shape[0]  # the decoder's last level (index 0) has width ch
    mult = tuple(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(n_up))
    if top != mult[-1] * ch:
        raise UnsupportedModelError("VAE decoder widths are inconsistent")
    post = sd.get("post_quant_conv.weight")
    return VAEConfig(
        in_channels=conv_in.shape[1] if conv_in is not None else dec_out.shape[0],
        out_channels=dec_out.shape[0], ch=ch, ch_mult=mult,
        num_res_blocks=_count(keys, r"decoder\.up\.0\.block\.(\d+)\.") - 1,
        z_channels=dec_in.shape[1], embed_dim=post.shape[1] if post is not None else dec_in.shape[1],
    )


def detect_text_encoder(sd: Mapping[str, torch.Tensor], base: TextEncoderConfig) -> TextEncoderConfig:
    """Widths of a CLIP text encoder from its keys (HF or OpenCLIP layout); usage from `base`."""
    keys = set(sd)
    if "token_embedding.weight" in sd:  # OpenCLIP
        emb = sd["token_embedding.weight"]
        layers = _count(keys, r"transformer\.resblocks\.(\d+)\.")
        inter = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        proj = sd["text_projection"].shape[1] if "text_projection" in sd else None
        positions = sd["positional_embedding"].shape[0]
        fmt = "openclip"
    else:
        pre = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
        try:
            emb = sd[f"{pre}embeddings.token_embedding.weight"]
            inter = sd[f"{pre}encoder.layers.0.mlp.fc1.weight"].shape[0]
            positions = sd[f"{pre}embeddings.position_embedding.weight"].shape[0]
        except KeyError as e:
            raise UnsupportedModelError(f"text encoder weights lack {e.args[0]!r}: not a CLIP text model") from None
        layers = _count(keys, rf"{re.escape(pre)}encoder\.layers\.(\d+)\.")
        proj = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else None
        fmt = "hf"
    hidden = emb.shape[1]
    return base.replace(
        hidden_size=hidden, num_layers=layers, num_heads=hidden // math.gcd(hidden, HEAD_CHANNELS),
        intermediate_size=inter, vocab_size=emb.shape[0], max_positions=positions, projection_dim=proj,
        key_format=fmt,
    )


# Which text-encoder prefixes each family uses, in the order of ModelConfig.text_encoders.
FAMILY_TEXT_PREFIXES: dict[str, tuple[str, ...]] = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    "sdxl_refiner": ("conditioner.embedders.0.model.",),
}


def text_prefixes(config: ModelConfig) -> tuple[str, ...]:
    """Text-encoder key prefixes of a config's family (custom configs: by encoder count/format)."""
    base = config.family.removesuffix("_inpaint").removesuffix("_v")
    if base in FAMILY_TEXT_PREFIXES:
        return FAMILY_TEXT_PREFIXES[base]
    if len(config.text_encoders) == 2:
        return FAMILY_TEXT_PREFIXES["sdxl"]
    te = config.text_encoders[0]
    return FAMILY_TEXT_PREFIXES["sd1" if te.key_format == "hf" else "sd2"]


def _structure(u: UNetConfig) -> tuple:
    """What identifies a UNet family regardless of widths."""
    return (u.channel_mult, u.num_res_blocks, u.transformer_depth, u.transformer_depth_middle,
            u.use_linear_in_transformer, u.adm_in_channels is not None, u.num_classes is not None)


def _family(unet: UNetConfig, comps: Components) -> str | None:
    tes = set(comps.text_encoders)
    for name, preset in PRESETS.items():
        if name.endswith("_v"):
            continue
        if _structure(preset.unet) != _structure(unet) or preset.unet.in_channels != unet.in_channels:
            continue
        base = name.removesuffix("_inpaint")
        if set(FAMILY_TEXT_PREFIXES[base]) <= tes or not tes:
            return name
    return None


def _is_v_prediction(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: str) -> bool:
    if "v_pred" in tensors:  # marker key written by several trainers (ComfyUI honours it too)
        return True
    if metadata.get("modelspec.prediction_type", "").lower() in ("v", "v_prediction", "v-prediction"):
        return True
    if family == "sd2":
        # SD2.x 768-v files carry no marker. Same signal ComfyUI uses: in v models this
        # LayerNorm bias of the last output transformer has a much larger spread.
        bias = tensors.get(ckpt.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if bias is not None and torch.std(bias.float(), unbiased=False) > 0.09:
            return True
    return False


def config_from_metadata(metadata: Mapping[str, str]) -> ModelConfig | None:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        return ModelConfig.from_dict(json.loads(raw))
    except (json.JSONDecodeError, ConfigError) as e:
        raise UnsupportedModelError(f"the file's embedded {CONFIG_METADATA_KEY} metadata is invalid: {e}") from None


def detect_config(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, prediction: str | None = None
) -> ModelConfig:
    """The ModelConfig of a single-file checkpoint. `prediction` ("eps"/"v") overrides detection."""
    metadata = metadata or {}
    embedded = config_from_metadata(metadata)
    if embedded is not None:
        return embedded if prediction is None else embedded.replace(prediction=prediction)
    comps = ckpt.split_components(dict(tensors))
    if not comps.unet:
        _explain_missing_unet(tensors, comps)
    unet = detect_unet(comps.unet)
    family = _family(unet, comps)
    if family is None:
        raise UnsupportedModelError(
            "unsupported model: found a UNet with "
            f"in_channels={unet.in_channels}, channel_mult={unet.channel_mult}, res_blocks={unet.num_res_blocks}, "
            f"transformer_depth={unet.transformer_depth}/{unet.transformer_depth_middle}, "
            f"context_dim={unet.context_dim}, linear_proj={unet.use_linear_in_transformer}, "
            f"adm={unet.adm_in_channels}; text encoders at {sorted(comps.text_encoders) or 'none'}. "
            f"Supported families: {SUPPORTED}."
        )
    preset = PRESETS[family]
    base = family.removesuffix("_inpaint")
    tes = tuple(
        detect_text_encoder(comps.text_encoders[p], te) if p in comps.text_encoders else te
        for p, te in zip(FAMILY_TEXT_PREFIXES[base], preset.text_encoders)
    )
    vae = detect_vae(comps.vae) if comps.vae else preset.vae
    is_v = prediction == "v" if prediction is not None else _is_v_prediction(tensors, metadata, family)
    if is_v and family == "sd2":
        family = "sd2_v"
    return preset.replace(
        family=family, unet=unet, vae=vae, text_encoders=tes, prediction="v" if is_v else "eps",
        schedule=preset.schedule.replace(zero_terminal_snr="ztsnr" in tensors),
    )


def _explain_missing_unet(tensors: Mapping[str, torch.Tensor], comps: Components) -> None:
    keys = list(tensors)
    if comps.vae and not comps.text_encoders:
        raise WrongComponentError(
            "this file is a standalone VAE (encoder/decoder weights only), not a full checkpoint: "
            "load it with a VAE loader (VAELoader) and pair it with a checkpoint"
        )
    if comps.text_encoders and not comps.vae:
        raise WrongComponentError(
            "this file holds only text-encoder weights: load it with a text-encoder (CLIP) loader"
        )
    raise UnsupportedModelError(
        f"no diffusion UNet found (expected keys under {ckpt.UNET_PREFIX!r}). "
        f"The file holds {len(keys)} tensors: {prefix_summary(keys)}. Supported families: {SUPPORTED}."
    )
