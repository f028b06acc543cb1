"""Loading checkpoints and standalone component files into ready-to-run models.

Every module is built on the meta device and then takes the file's tensors by
assignment, so a CPU fp32 load of an fp32 safetensors file copies no weight at all
(they stay views of the memory-mapped file until used).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ldm_core.checkpoints import weights_file as ckpt
from ldm_core.checkpoints.model_family import detect_config, detect_text_encoder, detect_unet, detect_vae, text_prefixes
from ldm_core.checkpoints.weights_file import read_weights, split_components
from ldm_core.device import Precision, available_ram, parse_dtype, pick_device, pick_precision, require_ram
from ldm_core.errors import StateDictMismatchError, UnsupportedModelError, WrongComponentError
from ldm_core.imaging.preview import LatentPreviewer, VAEPreview
from ldm_core.loading.model import VAE, Checkpoint, DiffusionModel, TextEncoder
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.clip_text import ClipTextEncoder, TextEncoderSet
from ldm_core.networks.config import ModelConfig, TextEncoderConfig
from ldm_core.networks.presets import CLIP_G, CLIP_H, CLIP_L, PRESETS
from ldm_core.networks.unet import UNetModel
from ldm_core.networks.weight_cast import compute_in, storage_dtype
from ldm_core.text.tokenizer import ClipTokenizer


def _place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module.eval().requires_grad_(False).to(device)


def _build(build: Any, what: str, config: Any, sd: dict[str, torch.Tensor], compute: torch.dtype,
           weight_dtype: torch.dtype | None) -> torch.nn.Module:
    """`build(config, sd, storage dtype)`, computing in `compute` (weight_cast.py): weights stay in
    the file's dtype unless `weight_dtype` forces one."""
    storage = storage_dtype(sd, compute, weight_dtype)
    _check_copy_fits(what, sd, storage)
    module = _wrap(build, what, config, sd, storage)
    return compute_in(module, compute)


def _check_copy_fits(what: str, sd: dict[str, torch.Tensor], storage: torch.dtype) -> None:
    """Weights converted to another dtype are copied (the file's own dtype is only mapped): refuse,
    before allocating, a copy larger than the RAM available, with what to do instead."""
    need = sum(t.numel() * torch.finfo(storage).bits // 8 for t in sd.values()
               if t.is_floating_point() and t.dtype != storage)
    require_ram(need, available_ram(), f"{what}: converting its weights to {str(storage).removeprefix('torch.')}",
                "keep them as stored in the file (weight_dtype auto, ldm-run --weight-dtype auto) or free memory")


def _build_text_encoder(config: ModelConfig, comps: ckpt.Components, device: torch.device,
                        dtype: torch.dtype, tokenizer: ClipTokenizer | None,
                        weight_dtype: torch.dtype | None) -> TextEncoder | None:
    prefixes = text_prefixes(config)
    if not all(p in comps.text_encoders for p in prefixes):
        return None
    encoders = []
    for prefix, te_config in zip(prefixes, config.text_encoders):
        what = f"text encoder {te_config.name} ({prefix}*)"
        encoders.append(_place(_build(ClipTextEncoder.from_state_dict, what, te_config, comps.text_encoders[prefix],
                                      dtype, weight_dtype), device))
    return TextEncoder(TextEncoderSet(encoders), tokenizer or ClipTokenizer(), device, dtype)


def _wrap(build: Any, what: str, *args: Any) -> Any:
    try:
        return build(*args)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(f"{what}: {e}") from None


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device | None = None, precision: Precision | None = None,
    prediction: str | None = None, config: ModelConfig | None = None, tokenizer: ClipTokenizer | None = None,
    weight_dtype: str | torch.dtype | None = None,
) -> Checkpoint:
    """Load a single-file checkpoint (SD1.x/2.x/XL, inpainting, or one carrying its config).

    `prediction` ("eps"/"v") overrides what the file says; `config` skips detection.
    The text encoder or VAE is None when the file lacks it (some checkpoints ship the
    UNet alone); a file that is only a VAE or only a text encoder is refused with a
    WrongComponentError that says which loader to use. `weight_dtype` ("auto"/None, "fp32", "fp16",
    "bf16") is how the weights are kept in memory; each part computes in its `precision` dtype.
    """
    weights = parse_dtype(weight_dtype)
    wf = read_weights(path)
    if config is None:
        config = detect_config(wf.tensors, wf.metadata, prediction=prediction)
    elif prediction is not None:
        config = config.replace(prediction=prediction)
    dev = pick_device(device)
    prec = precision or pick_precision(dev)
    comps = split_components(wf.tensors)
    unet = _build(UNetModel.from_state_dict, f"{Path(path).name}: UNet", config.unet, comps.unet, prec.unet, weights)
    model = DiffusionModel(_place(unet, dev), config, dev, prec.unet)
    text = _build_text_encoder(config, comps, dev, prec.text, tokenizer, weights)
    vae = None
    if comps.vae:
        v = _build(AutoencoderKL.from_state_dict, f"{Path(path).name}: VAE", config.vae, comps.vae, prec.vae, weights)
        vae = VAE(_place(v, dev), config.vae, dev, prec.vae)
    model.preview = LatentPreviewer.channels(model.latent_channels) if vae is None else VAEPreview(
        vae, config.latent_scale)
    layout_encoder = _build_layout_encoder(config, comps, dev) if config.layout is not None and comps.layout else None
    return Checkpoint(config, model, text, vae, Path(path), layout_encoder)


def _build_layout_encoder(config: ModelConfig, comps: ckpt.Components, device: torch.device):
    from ldm_core.conditioning.layout import load_layout_encoder as build

    return _place(build(comps.layout, config.layout, prefix=""), device)


def load_layout_encoder(path: str | os.PathLike, *, device: str | torch.device | None = None):
    """The box-layout encoder (fp32) of a checkpoint whose config has a `layout` part."""
    wf = read_weights(path)
    config = detect_config(wf.tensors, wf.metadata)
    comps = split_components(wf.tensors)
    if config.layout is None or not comps.layout:
        raise WrongComponentError(f"{Path(path).name} has no box-layout encoder (no `layout` in its config or no "
                                  f"{ckpt.LAYOUT_PREFIX}* weights); use a layout-to-image checkpoint such as "
                                  "the embedded ldm-scenes.safetensors")
    return _build_layout_encoder(config, comps, pick_device(device))


def load_vae(path: str | os.PathLike, *, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, weight_dtype: str | torch.dtype | None = None) -> VAE:
    """A standalone VAE file (keys `encoder.*`/`decoder.*`) or the VAE inside a full checkpoint."""
    wf = read_weights(path)
    comps = split_components(wf.tensors)
    if not comps.vae:
        raise WrongComponentError(
            f"{Path(path).name}: holds no VAE weights (expected encoder.*/decoder.* or first_stage_model.*); "
            f"it holds {ckpt.prefix_summary(list(wf.tensors))}"
        )
    dev = pick_device(device)
    dtype = dtype or pick_precision(dev).vae
    config = detect_vae(comps.vae)
    vae = _build(AutoencoderKL.from_state_dict, f"{Path(path).name}: VAE", config, comps.vae, dtype,
                 parse_dtype(weight_dtype))
    return VAE(_place(vae, dev), config, dev, dtype)


def load_diffusion_model(path: str | os.PathLike, *, family: str | None = None,
                         device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                         prediction: str | None = None, weight_dtype: str | torch.dtype | None = None,
                         ) -> DiffusionModel:
    """A UNet-only file (keys with or without `model.diffusion_model.`)."""
    wf = read_weights(path)
    sd = split_components(wf.tensors).unet or {k: v for k, v in wf.tensors.items() if k.startswith(
        ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb."))}
    if not sd:
        raise WrongComponentError(f"{Path(path).name}: holds no diffusion UNet weights")
    unet_config = detect_unet(sd)
    base = _family_for_unet(unet_config, family)
    config = PRESETS[base].replace(unet=unet_config)
    if prediction is not None:
        config = config.replace(prediction=prediction)
    dev = pick_device(device)
    dtype = dtype or pick_precision(dev).unet
    unet = _build(UNetModel.from_state_dict, f"{Path(path).name}: UNet", unet_config, sd, dtype,
                  parse_dtype(weight_dtype))
    model = DiffusionModel(_place(unet, dev), config, dev, dtype)
    model.preview = LatentPreviewer.channels(model.latent_channels)  # no VAE known: structure only
    return model


def _family_for_unet(unet: Any, family: str | None) -> str:
    if family is not None:
        if family not in PRESETS:
            raise UnsupportedModelError(f"unknown family {family!r}; known: {', '.join(PRESETS)}")
        return family
    by_context = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
    name = by_context.get(unet.context_dim)
    if name is None:
        raise UnsupportedModelError(
            f"cannot tell the family of a UNet with context_dim={unet.context_dim}; pass family= one of {', '.join(PRESETS)}"
        )
    return name + ("_inpaint" if unet.in_channels == 9 and name in ("sd1", "sd2") else "")


def load_text_encoder(paths: list[str | os.PathLike] | str | os.PathLike, *, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None, tokenizer: ClipTokenizer | None = None,
                      weight_dtype: str | torch.dtype | None = None) -> TextEncoder:
    """Standalone CLIP text-encoder files: one (CLIP-L / ViT-H / bigG) or two (SDXL: CLIP-L + bigG)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    dev = pick_device(device)
    dtype = dtype or pick_precision(dev).text
    encoders = []
    for p in paths:
        wf = read_weights(p)
        comps = split_components(wf.tensors)
        sd = next(iter(comps.text_encoders.values())) if len(comps.text_encoders) == 1 else wf.tensors
        base = _text_base(sd, len(paths))
        config = detect_text_encoder(sd, base)
        encoders.append(_place(_build(ClipTextEncoder.from_state_dict, f"{Path(p).name}: text encoder", config, sd,
                                      dtype, parse_dtype(weight_dtype)), dev))
    return TextEncoder(TextEncoderSet(encoders), tokenizer or ClipTokenizer(), dev, dtype)


def _text_base(sd: dict[str, torch.Tensor], count: int) -> TextEncoderConfig:
    """Usage defaults for a standalone text encoder: by layout, layer count, and SDXL pairing."""
    if "token_embedding.weight" in sd or any(k.startswith("transformer.resblocks.") for k in sd):
        layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        return CLIP_G if layers == 32 else CLIP_H
    if any(".embeddings.token_embedding." in k or k.startswith("embeddings.token_embedding") for k in sd):
        return PRESETS["sdxl"].text_encoders[0] if count == 2 else CLIP_L
    raise WrongComponentError(f"not a CLIP text encoder: {ckpt.prefix_summary(list(sd))}")
