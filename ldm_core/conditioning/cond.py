"""Conditioning: what a prompt becomes on its way into the UNet, and where and when it applies.

A `Conditioning` is a list of `Cond` entries (one per combined prompt), the engine's
counterpart of ComfyUI's CONDITIONING list of [tensor, dict] pairs. Each entry holds
the cross-attention context τθ(y) and, for SDXL-style models, the pooled text vector
that enters the UNet's ADM label embedding together with size conditioning.

Regional conditioning (ComfyUI's semantics): an entry may cover only an `Area` of the
latent, carry a `mask` that weights it per latent cell, and apply only for part of the
sampling run (`start_percent`..`end_percent` of the schedule, 0 = first step). The
operations below only describe this; `sampling/guidance.py` evaluates it at every step.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ldm_core.networks.config import ModelConfig

log = logging.getLogger(__name__)

PIXELS_PER_LATENT = 8  # ComfyUI's fixed pixel→latent factor for ConditioningSetArea
SET_COND_AREA = ("default", "mask bounds")


class ConditioningError(ValueError):
    """Conditioning that cannot be applied as asked; the message says which input and what to do."""


@dataclass(frozen=True)
class Area:
    """A rectangle of the latent: `height`, `width`, top `y`, left `x`.

    `fraction=False`: latent cells (ints). `fraction=True`: fractions of the latent's size,
    resolved per latent like ComfyUI's percentage areas: size = max(1, round(f·dim)),
    offset = round(f·dim) (Python's round, half to even).
    """

    height: float
    width: float
    y: float
    x: float
    fraction: bool = False

    def resolve(self, latent_h: int, latent_w: int) -> tuple[int, int, int, int]:
        """(h, w, y, x) in latent cells for a latent of latent_h × latent_w."""
        if not self.fraction:
            return int(self.height), int(self.width), int(self.y), int(self.x)
        return (max(1, round(self.height * latent_h)), max(1, round(self.width * latent_w)),
                round(self.y * latent_h), round(self.x * latent_w))


@dataclass(frozen=True)
class Cond:
    """One conditioning entry.

    context: [1, T, D] (T a multiple of 77 for CLIP); pooled: [1, P] or None.
    strength: weight of this entry where several overlap (ComfyUI's "strength").
    area: where the entry applies (None: everywhere). mask: [B, H, W] or [H, W] weights in
    0..1 at any resolution (resized to the latent bilinearly), scaled by mask_strength;
    mask_bounds: use the mask's bounding box as the area ("mask bounds").
    start_percent/end_percent: the part of the schedule where the entry applies.
    extra: e.g. SDXL width/height/crop/target/aesthetic_score; "concat": a model-space
    tensor [1 or B, C_extra, h, w] stacked onto the UNet input (inpainting channels).
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    strength: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    area: Area | None = None
    mask: torch.Tensor | None = None
    mask_strength: float = 1.0
    mask_bounds: bool = False
    start_percent: float = 0.0
    end_percent: float = 1.0

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
    from ldm_core.networks.unet import size_embedding  # local: conditioning stays importable without building models

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


# ---- operations on a whole Conditioning (ComfyUI's Conditioning* nodes) ----

def _check(conditioning: Sequence[Cond], name: str) -> list[Cond]:
    if not isinstance(conditioning, (list, tuple)) or not all(isinstance(c, Cond) for c in conditioning):
        raise ConditioningError(f"{name}: expected a conditioning (a list of entries from a text encoder), "
                                f"got {type(conditioning).__name__}")
    return list(conditioning)


def _first(conditioning: Sequence[Cond], name: str, op: str) -> Cond:
    entries = _check(conditioning, name)
    if not entries:
        raise ConditioningError(f"{name} is empty; connect a conditioning from a text encoder")
    if len(entries) > 1:
        log.warning("%s: %s has %d entries; only the first is used (as ComfyUI does)", op, name, len(entries))
    return entries[0]


def _unit(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConditioningError(f"{name} must be between 0 and 1, got {value}")
    return float(value)


def _nonnegative(value: float, name: str) -> float:
    if not value >= 0.0:  # also refuses NaN
        raise ConditioningError(f"{name} must be 0 or more, got {value}")
    return float(value)


def combine(conditioning_1: Sequence[Cond], conditioning_2: Sequence[Cond]) -> Conditioning:
    """Both lists' entries; at sampling they are evaluated separately and averaged by weight."""
    return _check(conditioning_1, "conditioning_1") + _check(conditioning_2, "conditioning_2")


def concat(conditioning_to: Sequence[Cond], conditioning_from: Sequence[Cond]) -> Conditioning:
    """Append the first `from` entry's tokens to every `to` entry: context [1, T_to + T_from, D].

    One attention over both prompts' tokens (unlike `combine`, which averages two outputs).
    """
    source = _first(conditioning_from, "conditioning_from", "ConditioningConcat").context
    out = []
    for c in _check(conditioning_to, "conditioning_to"):
        if c.context.shape[-1] != source.shape[-1]:
            raise ConditioningError(f"conditioning_from has width {source.shape[-1]}, conditioning_to "
                                    f"{c.context.shape[-1]}: both must come from the same model's text encoder")
        out.append(replace(c, context=torch.cat([c.context, source.to(c.context)], dim=1)))
    return out


def average(conditioning_to: Sequence[Cond], conditioning_from: Sequence[Cond],
            conditioning_to_strength: float) -> Conditioning:
    """w·to + (1 − w)·from, token by token, w = conditioning_to_strength (ComfyUI's ConditioningAverage).

    `from` (its first entry) is cut or zero-padded on the token axis to each `to` entry's
    length. Pooled vectors mix the same way when both exist; a `to` entry without one takes
    `from`'s.
    """
    w = _unit(conditioning_to_strength, "conditioning_to_strength")
    source = _first(conditioning_from, "conditioning_from", "ConditioningAverage")
    out = []
    for c in _check(conditioning_to, "conditioning_to"):
        t1 = c.context
        if t1.shape[-1] != source.context.shape[-1]:
            raise ConditioningError(f"conditioning_from has width {source.context.shape[-1]}, conditioning_to "
                                    f"{t1.shape[-1]}: both must come from the same model's text encoder")
        t0 = source.context[:, : t1.shape[1]].to(t1)
        if t0.shape[1] < t1.shape[1]:
            t0 = torch.cat([t0, t0.new_zeros(1, t1.shape[1] - t0.shape[1], t1.shape[2])], dim=1)
        pooled = c.pooled if c.pooled is not None else source.pooled  # ComfyUI then mixes `from` with itself
        if source.pooled is not None:
            pooled = pooled * w + source.pooled.to(pooled) * (1.0 - w)
        out.append(replace(c, context=t1 * w + t0 * (1.0 - w), pooled=pooled))
    return out


def zero_out(conditioning: Sequence[Cond]) -> Conditioning:
    """Every entry with zero context and zero pooled vector (other settings kept)."""
    return [replace(c, context=torch.zeros_like(c.context),
                    pooled=None if c.pooled is None else torch.zeros_like(c.pooled))
            for c in _check(conditioning, "conditioning")]


def set_timestep_range(conditioning: Sequence[Cond], start: float, end: float) -> Conditioning:
    """Apply only while the sampling progress is within [start, end] (0: first step, 1: last).

    Progress p maps to σ(p) = σ_schedule((1 − p)·(T − 1)), the model's own schedule; an entry
    is skipped at any σ above σ(start) or below σ(end).
    """
    start, end = _unit(start, "start"), _unit(end, "end")
    return [replace(c, start_percent=start, end_percent=end) for c in _check(conditioning, "conditioning")]


def set_area(conditioning: Sequence[Cond], width: int, height: int, x: int, y: int,
             strength: float = 1.0) -> Conditioning:
    """Limit to a pixel rectangle, stored in latent cells: (height//8, width//8, y//8, x//8)."""
    for name, v in (("width", width), ("height", height), ("x", x), ("y", y)):
        if int(v) != v or v < 0:
            raise ConditioningError(f"{name} must be a whole number of pixels, 0 or more; got {v}")
    f = PIXELS_PER_LATENT
    if width < f or height < f:
        raise ConditioningError(f"area {width}×{height} px is smaller than one latent cell ({f} px)")
    area = Area(int(height) // f, int(width) // f, int(y) // f, int(x) // f)
    return [replace(c, area=area, strength=_nonnegative(strength, "strength"), mask_bounds=False)
            for c in _check(conditioning, "conditioning")]


def set_area_percentage(conditioning: Sequence[Cond], width: float, height: float, x: float, y: float,
                        strength: float = 1.0) -> Conditioning:
    """Limit to a rectangle given as fractions (0..1) of the image, resolved per latent size."""
    area = Area(_unit(height, "height"), _unit(width, "width"), _unit(y, "y"), _unit(x, "x"), fraction=True)
    return [replace(c, area=area, strength=_nonnegative(strength, "strength"), mask_bounds=False)
            for c in _check(conditioning, "conditioning")]


def set_area_strength(conditioning: Sequence[Cond], strength: float) -> Conditioning:
    """Set the weight of every entry where entries overlap."""
    return [replace(c, strength=_nonnegative(strength, "strength")) for c in _check(conditioning, "conditioning")]


def set_mask(conditioning: Sequence[Cond], mask: torch.Tensor, strength: float = 1.0,
             set_cond_area: str = "default") -> Conditioning:
    """Weight every entry per cell by mask·strength (mask [B, H, W] or [H, W], any size: it is
    resized to the latent). "mask bounds": also evaluate the model only on the mask's bounding
    box (at least 8×8 latent cells), which is faster and gives the region the model's full
    attention; "default": on the whole latent (or the area set before)."""
    if set_cond_area not in SET_COND_AREA:
        raise ConditioningError(f"set_cond_area must be one of {', '.join(SET_COND_AREA)}; got {set_cond_area!r}")
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or mask.numel() == 0:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ConditioningError(f"mask must be a MASK tensor [B, H, W] or [H, W]; got {shape}")
    mask = mask.float().unsqueeze(0) if mask.ndim == 2 else mask.float()
    return [replace(c, mask=mask, mask_strength=_nonnegative(strength, "strength"),
                    mask_bounds=set_cond_area != "default") for c in _check(conditioning, "conditioning")]
