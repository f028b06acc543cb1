"""Conditioning: what a prompt becomes on its way into the UNet.

A `Conditioning` is a list of `Cond` entries (one per combined prompt), the engine's
counterpart of ComfyUI's CONDITIONING list of [tensor, dict] pairs. Each entry holds
the cross-attention context τθ(y) and, for SDXL-style models, the pooled text vector
that enters the UNet's ADM label embedding together with size conditioning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .config import ModelConfig


@dataclass(frozen=True)
class Cond:
    """One conditioning entry. context: [1, T, D] (T a multiple of 77); pooled: [1, P] or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    strength: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. SDXL width/height/crop/target/aesthetic_score

    def with_extra(self, **kw: Any) -> "Cond":
        return replace(self, extra={**self.extra, **kw})


Conditioning = list[Cond]


def repeat_to_length(context: torch.Tensor, length: int) -> torch.Tensor:
    """Tile the token axis to `length` (a multiple of it). Attention over k identical copies
    of every key/value gives the same softmax average, so this changes no result; it lets
    prompts of different chunk counts share one batched forward."""
    t = context.shape[1]
    if length % t:
        raise ValueError(f"cannot tile {t} tokens to {length}")
    return context.repeat(1, length // t, 1)


def common_length(contexts: list[torch.Tensor]) -> int:
    return math.lcm(*(c.shape[1] for c in contexts))


def adm_vector(config: ModelConfig, cond: Cond, width: int, height: int) -> torch.Tensor | None:
    """The UNet's ADM input y for SDXL-family models, None for the others.

    SDXL base: [pooled, emb(h), emb(w), emb(crop_top), emb(crop_left), emb(target_h), emb(target_w)];
    refiner: [pooled, emb(h), emb(w), emb(crop_top), emb(crop_left), emb(aesthetic_score)], each emb
    the 256-wide sinusoidal embedding. Sizes default to the image being generated (pixels).
    """
    if config.adm == "none":
        return None
    from .unet import size_embedding  # local: conditioning stays importable without building models

    if cond.pooled is None:
        raise ValueError(f"{config.family} needs a pooled text embedding; this conditioning has none")
    e = cond.extra
    h, w = e.get("height", height), e.get("width", width)
    values = [h, w, e.get("crop_h", 0), e.get("crop_w", 0)]
    if config.adm == "sdxl":
        values += [e.get("target_height", height), e.get("target_width", width)]
    else:
        values += [e.get("aesthetic_score", 6.0)]
    scalars = torch.tensor([values], dtype=torch.float32)
    return torch.cat([cond.pooled.float().cpu(), size_embedding(scalars)], dim=1)
