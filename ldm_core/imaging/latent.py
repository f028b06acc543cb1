"""The LATENT socket payload, in ComfyUI's convention: a dict with `samples` [B, C, h, w]
holding raw (unscaled) VAE latents, optionally `noise_mask` and `batch_index`."""
from __future__ import annotations

import math
from typing import Any

import torch

from ldm_core.device import available_ram, require_ram


def cells(pixels: int, factor: int) -> int:
    """Latent cells covering `pixels` image pixels at `factor` pixels per cell (floored): the one
    pixel → latent conversion (f = the VAE's downsampling factor, `VAEConfig.downsample_factor`)."""
    return pixels // factor


def pixels(cells: int, factor: int) -> int:
    """Image pixels covered by `cells` latent cells at `factor` pixels per cell."""
    return cells * factor


def empty(width: int, height: int, batch_size: int = 1, channels: int = 4, factor: int = 8) -> torch.Tensor:
    """Zeros [B, C, H/f, W/f] (sizes floored to multiples of f), as EmptyLatentImage. A size whose
    latent alone would not fit in the RAM there is is refused before allocating."""
    shape = (batch_size, channels, cells(height, factor), cells(width, factor))
    require_ram(math.prod(shape) * 4, available_ram(), f"a latent of {batch_size} × {width}×{height}",
                "use a smaller size or batch (or tiled diffusion)", share=0.5)
    return torch.zeros(shape)


def with_samples(latent: dict[str, Any], samples: torch.Tensor) -> dict[str, Any]:
    """A copy of `latent` with new samples; its other keys (noise_mask, batch_index) carried along."""
    out = dict(latent)
    out["samples"] = samples
    return out


def check(latent: Any, what: str = "latent") -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor) or latent["samples"].ndim != 4:
        raise ValueError(f"{what}: expected a LATENT (a dict with 4-D 'samples'), got {type(latent).__name__}")
    return latent["samples"]
