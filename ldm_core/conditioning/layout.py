"""Layouts of boxes: parsing, regional prompts for any model, and the paper's box-layout encoder.

Two ways to condition on "this object in this box":

1. Regional prompts (any text-conditioned model): each (prompt, box) becomes a conditioning
   entry restricted to its box's area (sampling/guidance.py composes the regions at every step).
2. Layout-to-image (Rombach et al. 2022, §4.3 and appendix): a layout is a sequence of
   tokens, three per object (class, top-left corner, bottom-right corner), and a
   transformer τθ encodes the sequence into the cross-attention context [B, 3·N, D].

Layout text, one object a line (the format both nodes read)::

    a red circle | 0.1 0.1 0.4 0.4          # fractions of the image: x0 y0 x1 y1
    a blue square | 256, 64, 448, 320       # pixels (any value above 1 means pixels)
    a tree | 10% 50% 40% 100% | 1.5         # percentages; optional third field: strength

Blank lines and text after `#` are ignored; numbers may be separated by spaces or commas.

Vocabulary of the box-layout tokens (as the paper's object-centric builder): V tokens, a
grid of g = ⌊√V⌋ cells per side. A corner (x, y) ∈ [0, 1]² is token
round(y·(g − 1))·g + round(x·(g − 1)); a class is its id (0..num_classes − 1); V − 1 pads
the sequence to `max_objects` triples. Tokens share ids; their position in the triple
says what they are. With `LayoutEncoderConfig.box_features` > 0 (not in the paper; the embedded
model uses it), each object's class token also gets a learned embedding of Fourier features of
its box, so the box's geometry is in one token rather than in two lookup-table entries.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.conditioning.cond import Area, Cond, ConditioningError
from ldm_core.networks.config import LayoutEncoderConfig

PIXELS_PER_LATENT = 8
PREFIX = "cond_stage_model."  # where the layout encoder's weights live in an LDM checkpoint


class LayoutError(ConditioningError):
    """A layout line or box that cannot be used; the message names the line and what to fix."""


# ---- boxes and the layout text ----

@dataclass(frozen=True)
class Box:
    """x0 < x1, y0 < y1; fractions of the image when `pixels` is False, else pixels."""

    x0: float
    y0: float
    x1: float
    y1: float
    pixels: bool = False

    def fractions(self, width: int | None = None, height: int | None = None) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in 0..1; pixel boxes need the image size."""
        if not self.pixels:
            return (self.x0, self.y0, self.x1, self.y1)
        if not width or not height:
            raise LayoutError("a box in pixels needs the image width and height to become fractions")
        return (min(self.x0 / width, 1.0), min(self.y0 / height, 1.0),
                min(self.x1 / width, 1.0), min(self.y1 / height, 1.0))

    def area(self) -> Area:
        """The conditioning area: fractions stay fractions; pixels snap outward to latent cells."""
        if not self.pixels:
            return Area(self.y1 - self.y0, self.x1 - self.x0, self.y0, self.x0, fraction=True)
        f = PIXELS_PER_LATENT
        y, x = int(self.y0 // f), int(self.x0 // f)
        return Area(math.ceil(self.y1 / f) - y, math.ceil(self.x1 / f) - x, y, x)


@dataclass(frozen=True)
class LayoutObject:
    label: str
    box: Box
    strength: float | None = None


_NUMBER = re.compile(r"^([0-9]*\.?[0-9]+)(%|px)?$")


def parse_box(text: str, where: str = "box") -> Box:
    """"x0 y0 x1 y1" (spaces or commas): fractions if all ≤ 1, `%` percentages, else pixels."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if len(parts) != 4:
        raise LayoutError(f"{where}: a box is four numbers x0 y0 x1 y1, got {text.strip()!r}")
    values, units = [], set()
    for p in parts:
        m = _NUMBER.match(p.lower())
        if m is None:
            raise LayoutError(f"{where}: {p!r} is not a number 0 or more (write 0.25, 25% or 128px)")
        values.append(float(m.group(1)) / (100.0 if m.group(2) == "%" else 1.0))
        units.add(m.group(2) or "")
    if "%" in units and len(units) > 1:
        raise LayoutError(f"{where}: mix of units in {text.strip()!r}; use one unit for all four numbers")
    pixels = "px" in units or ("%" not in units and max(values) > 1.0)
    x0, y0, x1, y1 = values
    if not (x1 > x0 and y1 > y0):
        raise LayoutError(f"{where}: the box needs x1 > x0 and y1 > y0 (top-left, then bottom-right corner); "
                          f"got {text.strip()!r}")
    if not pixels and max(values) > 1.0:
        raise LayoutError(f"{where}: fractions and percentages must lie within the image (≤ 1 or 100%)")
    return Box(x0, y0, x1, y1, pixels)


def parse_layout(text: str) -> list[LayoutObject]:
    """Layout text (see the module docstring) → objects, in order; errors name the line."""
    objects = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"layout line {n}"
        fields_ = [f.strip() for f in line.split("|")]
        if len(fields_) not in (2, 3):
            raise LayoutError(f"{where}: write `prompt | x0 y0 x1 y1` (optionally `| strength`), got {line!r}")
        label = fields_[0]
        if not label:
            raise LayoutError(f"{where}: the prompt (before `|`) is empty")
        strength = None
        if len(fields_) == 3:
            try:
                strength = float(fields_[2])
            except ValueError:
                raise LayoutError(f"{where}: strength {fields_[2]!r} is not a number") from None
            if not strength >= 0:
                raise LayoutError(f"{where}: strength must be 0 or more, got {fields_[2]}")
        objects.append(LayoutObject(label, parse_box(fields_[1], where), strength))
    return objects


def regional_conditioning(encode: Callable[[str], Cond], objects: Sequence[LayoutObject],
                          global_prompt: str = "", strength: float = 1.0) -> list[Cond]:
    """One conditioning entry per object, restricted to its box, plus the global prompt (if
    any) over the whole image. Object strength: its own, else `strength`."""
    if not objects and not global_prompt.strip():
        raise LayoutError("the layout has no objects and there is no global prompt; add a line `prompt | box`")
    out = [encode(global_prompt)] if global_prompt.strip() else []
    for obj in objects:
        s = strength if obj.strength is None else obj.strength
        out.append(replace(encode(obj.label), area=obj.box.area(), strength=float(s), mask_bounds=False))
    return out


# ---- box-layout tokens ----

def corner_token(config: LayoutEncoderConfig, x: float, y: float) -> int:
    """Grid token of a point in [0, 1]²: round(y·(g − 1))·g + round(x·(g − 1))."""
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise LayoutError(f"corner ({x}, {y}) lies outside the image; box coordinates are fractions 0..1")
    g = config.grid
    return round(y * (g - 1)) * g + round(x * (g - 1))


def tokenize_layout(config: LayoutEncoderConfig,
                    objects: Sequence[tuple[int, tuple[float, float, float, float]]]) -> torch.Tensor:
    """[(class id, (x0, y0, x1, y1) fractions), ...] → token ids [3·max_objects] (long):
    class, top-left, bottom-right per object, then pad triples."""
    if len(objects) > config.max_objects:
        raise LayoutError(f"{len(objects)} objects, the layout encoder takes at most {config.max_objects}; "
                          "drop the smallest boxes")
    tokens = []
    for class_id, (x0, y0, x1, y1) in objects:
        if not 0 <= int(class_id) < config.num_classes:
            raise LayoutError(f"class id {class_id} is outside 0..{config.num_classes - 1}")
        tokens += [int(class_id), corner_token(config, x0, y0), corner_token(config, x1, y1)]
    tokens += [config.pad_token] * (config.seq_len - len(tokens))
    return torch.tensor(tokens, dtype=torch.long)


def resolve_classes(objects: Sequence[LayoutObject], vocabulary: Sequence[str], width: int | None = None,
                    height: int | None = None) -> list[tuple[int, tuple[float, float, float, float]]]:
    """Layout objects → (class id, fraction box): a label is a class name of the vocabulary
    (case-insensitive) or a class id written as a number."""
    index = {name.strip().lower(): i for i, name in enumerate(vocabulary) if name.strip()}
    out = []
    for obj in objects:
        key = obj.label.strip().lower()
        if key.isdigit():
            out.append((int(key), obj.box.fractions(width, height)))
            continue
        if key not in index:
            near = [n for n in index if key in n or n in key][:5]
            hint = f"; close: {', '.join(near)}" if near else ""
            raise LayoutError(f"class {obj.label!r} is not in the layout model's vocabulary{hint}")
        out.append((index[key], obj.box.fractions(width, height)))
    return out


# ---- the encoder (attribute paths mirror the LDM checkpoint keys under `cond_stage_model.`) ----

class _PositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)


class _SelfAttention(nn.Module):
    """softmax(QKᵀ/√d_head)·V over all tokens, `heads` heads; q, k, v without bias."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Identity(),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Layers(nn.Module):
    """Pre-norm residual blocks, alternating attention and feed-forward: x + f(LayerNorm(x))."""

    def __init__(self, c: LayoutEncoderConfig) -> None:
        super().__init__()
        blocks = []
        for _ in range(c.depth):
            blocks.append(nn.ModuleList([nn.LayerNorm(c.dim), _SelfAttention(c.dim, c.heads, c.dim_head)]))
            blocks.append(nn.ModuleList([nn.LayerNorm(c.dim), _FeedForward(c.dim, c.ff_mult)]))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


def box_fourier(config: LayoutEncoderConfig, tokens: torch.Tensor) -> torch.Tensor:
    """[B, 3·N] token ids → [B, N, 8·F] features of each object's box, F = config.box_features: for
    v = x0, y0, x1, y1 in turn (fractions, decoded from the corner tokens), sin(2^k·π·v) for
    k = 0 … F − 1, then cos(2^k·π·v). Pad triples give the features of their pad ids; callers mask them."""
    g, b = config.grid, tokens.shape[0]
    corners = tokens.view(b, -1, 3)[..., 1:].float()
    coords = torch.stack([corners % g, torch.div(corners, g, rounding_mode="floor")], -1).flatten(-2) / (g - 1)
    angles = coords[..., None] * (math.pi * 2.0 ** torch.arange(config.box_features, device=tokens.device))
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


class _Transformer(nn.Module):
    def __init__(self, c: LayoutEncoderConfig) -> None:
        super().__init__()
        self.config = c
        self.token_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = _PositionalEmbedding(c.dim, c.max_seq_len)
        self.box_emb = nn.Linear(8 * c.box_features, c.dim) if c.box_features else None
        if self.box_emb is not None:
            nn.init.zeros_(self.box_emb.weight)
            nn.init.zeros_(self.box_emb.bias)
        self.attn_layers = _Layers(c)
        self.norm = nn.LayerNorm(c.dim)
        self.to_logits = nn.Linear(c.dim, c.vocab_size)  # unused for conditioning; present in checkpoints

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_emb(tokens) + self.pos_emb.emb(positions)[None]
        if self.box_emb is not None:  # onto each object's class token (the first of its triple)
            if tokens.shape[1] % 3:
                raise LayoutError(f"layout tokens come in triples (class, corner, corner); got {tokens.shape[1]}")
            b, n = tokens.shape
            real = (tokens.view(b, -1, 3)[..., 0] != self.config.pad_token).unsqueeze(-1)
            box = self.box_emb(box_fourier(self.config, tokens).to(x.dtype)) * real
            x = x + F.pad(box.unsqueeze(2), (0, 0, 0, 2)).view(b, n, -1)
        return self.norm(self.attn_layers(x))


class LayoutEncoder(nn.Module):
    """τθ(layout): token ids [B, 3·max_objects] → context [B, 3·max_objects, dim] for the
    UNet's cross-attention (its context_dim must equal `dim`)."""

    def __init__(self, config: LayoutEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = _Transformer(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.config.max_seq_len:
            raise LayoutError(f"layout tokens must be [B, ≤{self.config.max_seq_len}], got {tuple(tokens.shape)}")
        return self.transformer(tokens)

    @torch.inference_mode()
    def encode(self, objects: Sequence[tuple[int, tuple[float, float, float, float]]]) -> Cond:
        """One layout → a conditioning entry (context [1, 3·max_objects, dim])."""
        p = next(self.parameters())
        tokens = tokenize_layout(self.config, objects)[None].to(p.device)
        return Cond(context=self(tokens).float().cpu())


def layout_state_dict(encoder: LayoutEncoder, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The encoder's weights under their checkpoint names (`cond_stage_model.transformer.…`)."""
    return {prefix + k: v for k, v in encoder.state_dict().items()}


def load_layout_encoder(state_dict: Mapping[str, torch.Tensor], config: LayoutEncoderConfig,
                        prefix: str = PREFIX) -> LayoutEncoder:
    """Build an encoder from the `prefix` keys of a checkpoint; any missing key, extra key under
    the prefix, or shape mismatch is an error that names it."""
    encoder = LayoutEncoder(config)
    own = encoder.state_dict()
    found = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    if missing or unexpected:
        raise LayoutError(f"layout encoder weights do not match the config: missing {missing[:5]}"
                          f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{' …' if len(unexpected) > 5 else ''} (under {prefix!r})")
    for k, v in found.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LayoutError(f"{prefix}{k}: shape {tuple(v.shape)}, the config expects {tuple(own[k].shape)}")
    encoder.load_state_dict(found, strict=True)
    return encoder.eval()


def random_layout_encoder(config: LayoutEncoderConfig, seed: int = 0) -> LayoutEncoder:
    """An encoder with deterministic random weights (tests, synthetic checkpoints): weights
    N(0, 0.02²), biases 0, LayerNorms identity, drawn in state-dict order from `seed`."""
    encoder = LayoutEncoder(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return encoder.eval()


def encode_layout_text(encoder: LayoutEncoder, text: str, vocabulary: Sequence[str], width: int | None = None,
                       height: int | None = None) -> Cond:
    """Layout text (labels: class names of `vocabulary` or class ids) → the layout model's
    conditioning. Strengths in the text have no meaning here and are refused."""
    objects = parse_layout(text)
    if any(o.strength is not None for o in objects):
        raise LayoutError("a box-layout model has no per-object strength; remove the third `| strength` field")
    return encoder.encode(resolve_classes(objects, vocabulary, width, height))
