"""Synthetic checkpoints: the exact key layout of real single-file checkpoints, random weights.

No model can be downloaded here, so the real loading code is exercised on files made
by this module: every key, prefix and (at full width) shape of the released SD1.x,
SD2.x, inpainting and SDXL files, with seeded random values scaled so activations
stay in a sane range. `shrink()` presets keep the layout and narrow the widths.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_core.checkpoints.model_family import CONFIG_METADATA_KEY, text_prefixes
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.clip_keys import hf_to_openclip
from ldm_core.networks.clip_text import ClipTextEncoder
from ldm_core.networks.config import ModelConfig, TextEncoderConfig
from ldm_core.networks.unet import UNetModel


def randomize_(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded values for every float entry (replaced in the dict): norm weights ≈ 1, biases
    small, embeddings ~ N(0, 0.1²), other weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name in sorted(sd):
        t = sd[name]
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if t.ndim == 1 and leaf == "weight":  # norm scales
            r = r.mul_(0.1).add_(1)
        elif t.ndim <= 1:
            r = r.mul_(0.02)
        elif "embedding" in name:
            r = r.mul_(0.01 if "position" in name else 0.1)
        else:
            r = r.mul_(1 / math.sqrt(math.prod(t.shape[1:])))
        sd[name] = r.to(t.dtype)
    return sd


def random_state_dict(module_type: Callable[[Any], nn.Module], config: Any, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of `module_type(config)` filled by `randomize_` (built on meta: no init cost)."""
    with torch.device("meta"):
        shapes = module_type(config).state_dict()
    return randomize_({k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}, seed)


def text_encoder_file_keys(config: TextEncoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """A text encoder's tensors as a checkpoint stores them (HF or OpenCLIP names)."""
    sd = random_state_dict(ClipTextEncoder, config, seed)
    return hf_to_openclip(sd) if config.key_format == "openclip" else sd


def checkpoint_tensors(config: ModelConfig, seed: int = 0, *, vae: bool = True,
                       text: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint for `config`, keyed as the original files."""
    out: dict[str, torch.Tensor] = {}
    unet = random_state_dict(UNetModel, config.unet, seed)
    out.update({f"model.diffusion_model.{k}": v for k, v in unet.items()})
    if vae:
        sd = random_state_dict(AutoencoderKL, config.vae, seed + 1)
        out.update({f"first_stage_model.{k}": v for k, v in sd.items()})
    if text:
        for i, (prefix, te) in enumerate(zip(text_prefixes(config), config.text_encoders)):
            out.update({prefix + k: v for k, v in text_encoder_file_keys(te, seed + 2 + i).items()})
    return out


def save_checkpoint(config: ModelConfig, path: str | os.PathLike, seed: int = 0, *, dtype: torch.dtype | None = None,
                    embed_config: bool = False, extra: dict[str, torch.Tensor] | None = None,
                    vae: bool = True, text: bool = True) -> Path:
    """Write a synthetic single-file checkpoint (.safetensors, or .ckpt via torch.save)."""
    tensors = checkpoint_tensors(config, seed, vae=vae, text=text)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors.update(extra or {})
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())} if embed_config else None
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    else:
        torch.save({"state_dict": tensors, "global_step": 0}, path)
    return path
