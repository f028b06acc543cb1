"""The one table between OpenCLIP text-tower keys and transformers CLIP text keys.

`ClipTextEncoder` is laid out like transformers' `CLIPTextModelWithProjection`
(`text_model.embeddings.token_embedding.weight`, ..., `text_projection.weight`), which
are exactly the keys SD1.x and SDXL CLIP-L files carry after their prefix. SD2.x (ViT-H)
and SDXL (bigG) files carry the OpenCLIP layout instead; the differences are:

- one fused `attn.in_proj_weight` [3D, D] / `in_proj_bias` [3D] per block, split into
  q, k, v (in that order) along the first axis;
- `text_projection` stored as [D, P] and applied as `x @ P`, i.e. the transpose of a
  `nn.Linear(D, P).weight`;
- `logit_scale`, CLIP's contrastive temperature, which conditioning never uses.

Every function here maps keys and tensors only; shapes are checked by the loader.
Keys the table does not know are passed through unchanged, so strict loading names
them as the file spells them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

_HF_LAYER = "text_model.encoder.layers.{}."
_OC_LAYER = "transformer.resblocks.{}."

# OpenCLIP name -> transformers name, outside the residual blocks.
GLOBAL_KEYS: dict[str, str] = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
}

# Inside block i: OpenCLIP `transformer.resblocks.{i}.<key>` -> `text_model.encoder.layers.{i}.<value>`.
# A tuple value is a fused tensor split into equal parts along dim 0.
LAYER_KEYS: dict[str, str | tuple[str, ...]] = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}

# In the files, unused for conditioning, and absent from some conversions: dropped when present.
OPENCLIP_UNUSED = frozenset({"logit_scale"})
HF_UNUSED = frozenset({"text_model.embeddings.position_ids"})  # always arange(77); some merges corrupt it

_TRANSPOSED = frozenset({"text_projection"})
_BLOCK_INDEX = re.compile(r"(?:transformer\.resblocks|text_model\.encoder\.layers)\.(\d+)\.")
_HF_TOP = ("embeddings.", "encoder.", "final_layer_norm.")  # the `text_model.` level some old SD1 files lack


def key_pairs(num_layers: int) -> list[tuple[str, str | tuple[str, ...]]]:
    """Every (OpenCLIP key, transformers key or fused parts) of a tower with `num_layers` blocks."""
    pairs: list[tuple[str, str | tuple[str, ...]]] = list(GLOBAL_KEYS.items())
    for i in range(num_layers):
        oc, hf = _OC_LAYER.format(i), _HF_LAYER.format(i)
        for key, target in LAYER_KEYS.items():
            pairs.append((oc + key, tuple(hf + t for t in target) if isinstance(target, tuple) else hf + target))
    return pairs


def _num_layers(sd: Mapping[str, Tensor]) -> int:
    found = [int(m.group(1)) for k in sd if (m := _BLOCK_INDEX.match(k))]
    return max(found, default=-1) + 1


def openclip_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text-tower keys (prefix stripped) -> transformers CLIP keys.

    Fused q/k/v are split into views (no copy); `logit_scale` is dropped; unknown keys pass.
    """
    out = {k: v for k, v in sd.items() if k not in OPENCLIP_UNUSED}
    for oc, hf in key_pairs(_num_layers(sd)):
        if oc not in out:
            continue
        value = out.pop(oc)
        if isinstance(hf, tuple):
            out.update(zip(hf, value.chunk(len(hf), dim=0)))
        else:
            out[hf] = value.t().contiguous() if oc in _TRANSPOSED else value
    return out


def hf_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `openclip_to_hf` (never adds `logit_scale`): fuses q/k/v, transposes the projection.

    Unknown keys, and q/k/v parts of a block that lacks one of the three, pass unchanged.
    """
    out = dict(sd)
    for oc, hf in key_pairs(_num_layers(sd)):
        if isinstance(hf, tuple):
            if all(h in out for h in hf):
                out[oc] = torch.cat([out.pop(h) for h in hf], dim=0)
        elif hf in out:
            value = out.pop(hf)
            out[oc] = value.t().contiguous() if oc in _TRANSPOSED else value
    return out


def normalize_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers-layout keys as files vary -> the canonical `text_model.`-level names.

    Adds the `text_model.` level where a file lacks it and drops `position_ids`.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = "text_model." + key if key.startswith(_HF_TOP) else key
        if name not in HF_UNUSED:
            out[name] = value
    return out


def to_hf(sd: Mapping[str, Tensor], key_format: str) -> dict[str, Tensor]:
    """A text tower's state dict (prefix stripped) in either layout -> canonical transformers keys."""
    if key_format == "openclip":
        return openclip_to_hf(sd)
    if key_format == "hf":
        return normalize_hf(sd)
    raise ValueError(f"unknown CLIP key format {key_format!r}; expected 'hf' or 'openclip'")


__all__ = [
    "GLOBAL_KEYS", "LAYER_KEYS", "OPENCLIP_UNUSED", "HF_UNUSED", "key_pairs",
    "openclip_to_hf", "hf_to_openclip", "normalize_hf", "to_hf",
]
