"""Names LoRA files give to the weights of our UNet and text encoders, and synthetic LoRA files.

A LoRA file names each patched layer in one of several dialects; all of them are
derived here from the model's own state-dict keys (never from a hand-written list),
so every weight of the model gets every spelling:

UNet, for a weight `input_blocks.1.1.proj_in.weight` (our names are the original LDM
checkpoint keys) whose diffusers name is `down_blocks.0.attentions.0.proj_in.weight`:

- kohya, LDM-named (sd-scripts SDXL): `lora_unet_input_blocks_1_1_proj_in`
- kohya, diffusers-named (sd-scripts SD1/SD2): `lora_unet_down_blocks_0_attentions_0_proj_in`
- SimpleTuner LyCORIS: `lycoris_down_blocks_0_attentions_0_proj_in`
- diffusers / PEFT: `unet.down_blocks.0.attentions.0.proj_in` and without `unet.`;
  attention projections also as the old attention-processor names
  (`...attn1.processor.to_q`, `...attn1.processor.to_out`)
- generic: `diffusion_model.input_blocks.1.1.proj_in` (and `diffusion_model.<key>` for
  biases, which only full "diff" patches touch)

Text encoders (our keys `encoders.<name>.text_model.encoder.layers.0.mlp.fc1.weight`, the
transformers CLIP layout, which is also what SD1/SD2/SDXL LoRA trainers name):

- kohya: `lora_te_`, `lora_te1_` for the first encoder, `lora_te2_` for the second
  (SDXL bigG), then the transformers path with `_` for `.`: `lora_te1_text_model_encoder_layers_0_mlp_fc1`
- diffusers / PEFT: `text_encoder.text_model.encoder.layers.0.mlp.fc1`, `text_encoder_2.` for the second
- generic: `text_encoders.<name>.transformer.<path>` (ComfyUI's name for the same weight)

This is a superset of what ComfyUI 0.3.64 builds (`comfy.lora.model_lora_keys_unet/_clip`),
with the same target for every shared name; the tests compare against a recorded copy.
ComfyUI lacks the plain PEFT names of attention projections, which current diffusers writes.

LDM ↔ diffusers UNet naming, per block (L levels, R = num_res_blocks):
`input_blocks.n` with n = 1 + (R+1)·level + j is `down_blocks.level.resnets.j` (sub-module 0)
and `.attentions.j` (sub-module 1), or, for j = R, `down_blocks.level.downsamplers.0`;
`middle_block.0/1/2` are `mid_block.resnets.0`, `mid_block.attentions.0`, `mid_block.resnets.1`;
`output_blocks.n` with n = (R+1)·u + j is `up_blocks.u.resnets.j` / `.attentions.j`, and its
`conv` sub-module `up_blocks.u.upsamplers.0`. Inside a ResBlock: in_layers.0/2 = norm1/conv1,
emb_layers.1 = time_emb_proj, out_layers.0/3 = norm2/conv2, skip_connection = conv_shortcut;
inside transformers the names agree.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ldm_core.networks.config import ModelConfig, UNetConfig

UNET_PREFIXES = ("lora_unet_", "lycoris_", "unet.", "diffusion_model.", "down_blocks.", "mid_block.", "up_blocks.",
                 "conv_in", "conv_out", "time_embedding.", "add_embedding.")
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_prior_te_", "text_encoder.", "text_encoder_2.",
                 "text_encoders.")

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": ("time_embedding.linear_1",), "time_embed.2": ("time_embedding.linear_2",),
        "input_blocks.0.0": ("conv_in",), "out.0": ("conv_norm_out",), "out.2": ("conv_out",),
        "label_emb.0.0": ("add_embedding.linear_1", "class_embedding.linear_1"),
        "label_emb.0.2": ("add_embedding.linear_2", "class_embedding.linear_2")}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")


def _resnet_part(rest: str) -> str | None:
    for ldm, diffusers in _RESNET.items():
        if rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    return None


def unet_diffusers_names(key: str, config: UNetConfig) -> tuple[str, ...]:
    """The diffusers UNet2DConditionModel name(s) of one of our UNet state-dict keys (() if none).

    Two names only for SDXL's label embedding, which diffusers calls add_embedding (and
    class_embedding in other variants).
    """
    for ldm, names in _TOP.items():
        if key.startswith(ldm + "."):
            return tuple(n + key[len(ldm):] for n in names)
    if key.startswith("context_map."):  # no diffusers counterpart (see unet.ContextMap): its own name
        return (key,)
    per_level = config.num_res_blocks + 1
    if m := _BLOCK.fullmatch(key):
        side, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if side == "input_blocks":
            level, j = divmod(n - 1, per_level)
            if j == config.num_res_blocks:
                return (f"down_blocks.{level}.downsamplers.0.conv{rest[2:]}",) if rest.startswith("op.") else ()
            base = f"down_blocks.{level}"
        else:
            level, j = divmod(n, per_level)
            base = f"up_blocks.{level}"
            if rest.startswith("conv."):  # the Upsample, after the ResBlock (and attention)
                return (f"{base}.upsamplers.0.{rest}",)
        if sub == 0:
            part = _resnet_part(rest)
            return () if part is None else (f"{base}.resnets.{j}.{part}",)
        return (f"{base}.attentions.{j}.{rest}",)
    if m := _MIDDLE.fullmatch(key):
        sub, rest = int(m.group(1)), m.group(2)
        has_attention = config.transformer_depth_middle >= 0
        if has_attention and sub == 1:
            return (f"mid_block.attentions.0.{rest}",)
        part = _resnet_part(rest)
        index = sub // 2 if has_attention else sub
        return () if part is None else (f"mid_block.resnets.{index}.{part}",)
    return ()


def _processor_name(name: str) -> str:
    """Old diffusers attention-processor LoRA naming: `.to_q` → `.processor.to_q`, `.to_out.0` → `.processor.to_out`."""
    name = name.replace(".to_", ".processor.to_")
    return name[:-2] if name.endswith(".to_out.0") else name


def unet_key_map(keys: Iterable[str], config: UNetConfig) -> dict[str, str]:
    """LoRA layer name → our UNet state-dict key, for every key of the model (see the module docstring)."""
    out: dict[str, str] = {}
    for key in keys:
        if not key.endswith(".weight"):
            out[f"diffusion_model.{key}"] = key
            continue
        module = key[: -len(".weight")]
        out[f"lora_unet_{module.replace('.', '_')}"] = key
        out[f"diffusion_model.{module}"] = key
        for name in unet_diffusers_names(key, config):
            dmodule = name[: -len(".weight")]
            flat = dmodule.replace(".", "_")
            out[f"lora_unet_{flat}"] = key
            out[f"lycoris_{flat}"] = key
            for prefix in ("", "unet."):
                out[prefix + dmodule] = key
                out[prefix + _processor_name(dmodule)] = key
    return out


def text_prefixes(names: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """Per text encoder: (kohya prefixes, diffusers prefix). The first encoder is `te`/`te1`/
    `text_encoder`, a second one (SDXL bigG) `te2`/`text_encoder_2`; bigG also answers to
    `lora_prior_te_` (Stable Cascade / refiner LoRAs)."""
    out = {}
    for i, name in enumerate(names):
        kohya = ("lora_te_", "lora_te1_") if i == 0 else (f"lora_te{i + 1}_",)
        if name == "clip_g":
            kohya += ("lora_prior_te_",)
        out[name] = (kohya, "text_encoder." if i == 0 else f"text_encoder_{i + 1}.")
    return out


def text_key_map(keys: Iterable[str], names: list[str]) -> dict[str, str]:
    """LoRA layer name → our TextEncoderSet state-dict key (`encoders.<name>.<transformers path>`)."""
    out: dict[str, str] = {}
    prefixes = text_prefixes(names)
    for key in keys:
        parts = key.split(".", 2)
        if len(parts) < 3 or parts[0] != "encoders" or parts[1] not in prefixes or not key.endswith(".weight"):
            continue
        name, path = parts[1], parts[2][: -len(".weight")]
        kohya, diffusers = prefixes[name]
        out[f"text_encoders.{name}.transformer.{path}"] = key
        for p in kohya:
            out[p + path.replace(".", "_")] = key
        out[diffusers + path] = key
    return out


# ---------------------------------------------------------------------------
# Synthetic LoRA files with real names, for tests (no LoRA can be downloaded here).

STYLES = ("kohya", "kohya_ldm", "peft")


def _targets(module: nn.Module, convs: bool, attention_only: bool) -> list[tuple[str, torch.Size]]:
    out = []
    for path, layer in module.named_modules():
        if attention_only and ".transformer_blocks." not in f".{path}." and "proj_" not in path:
            continue
        if isinstance(layer, nn.Linear) or (convs and isinstance(layer, nn.Conv2d)):
            out.append((path + ".weight", layer.weight.shape))
    return out


def _unet_name(key: str, config: UNetConfig, style: str) -> str:
    if style == "kohya_ldm":
        return "lora_unet_" + key[: -len(".weight")].replace(".", "_")
    (name, *_) = unet_diffusers_names(key, config)
    module = name[: -len(".weight")]
    return "lora_unet_" + module.replace(".", "_") if style == "kohya" else "unet." + module


def _text_name(key: str, names: list[str], style: str) -> str:
    _, name, path = key.split(".", 2)
    kohya, diffusers = text_prefixes(names)[name]
    path = path[: -len(".weight")]
    if style == "peft":
        return diffusers + path
    kohya_prefix = kohya[0] if len(names) == 1 else f"lora_te{names.index(name) + 1}_"
    return kohya_prefix + path.replace(".", "_")


def random_lora(config: ModelConfig, *, style: str = "kohya", rank: int = 4, alpha: float | None = None,
                seed: int = 0, unet: bool = True, text: bool = True, convs: bool = True,
                attention_only: bool = False, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors for every Linear (and, with `convs`, Conv2d) weight of `config`'s models.

    `style`: "kohya" (`lora_unet_<diffusers>` / `lora_te*_`, `.lora_down/.lora_up/.alpha`),
    "kohya_ldm" (`lora_unet_<LDM path>`), "peft" (`unet.<diffusers>.lora_A/lora_B.weight`,
    `text_encoder*.`; no alpha, i.e. scale 1). 3×3 convolutions get LoCon factors: down
    [r, C_in, 3, 3], up [C_out, r, 1, 1]. Values ~ N(0, scale²), seeded.
    """
    from ldm_core.networks.clip_text import ClipTextEncoder, TextEncoderSet
    from ldm_core.networks.unet import UNetModel

    if style not in STYLES:
        raise ValueError(f"unknown LoRA style {style!r}; one of {', '.join(STYLES)}")
    g = torch.Generator().manual_seed(seed)
    targets: list[tuple[str, torch.Size]] = []
    with torch.device("meta"):
        if unet:
            targets += [(_unet_name(k, config.unet, style), s)
                        for k, s in _targets(UNetModel(config.unet), convs, attention_only)]
        if text and config.text_encoders:
            tes = TextEncoderSet([ClipTextEncoder(c) for c in config.text_encoders])
            names = [c.name for c in config.text_encoders]
            targets += [(_text_name("encoders." + k, names, style), s)
                        for k, s in _targets(tes.encoders, convs, False) if k.split(".")[1] == "text_model"]
    out: dict[str, torch.Tensor] = {}
    for name, shape in targets:
        r = min(rank, shape[0], math.prod(shape[1:]))
        down_shape = (r, *shape[1:])
        up_shape = (shape[0], r) + ((1, 1) if len(shape) == 4 else ())
        down = torch.randn(down_shape, generator=g) * scale
        up = torch.randn(up_shape, generator=g) * scale
        if style == "peft":
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        else:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write LoRA tensors as .safetensors (or a weights-only torch pickle for other suffixes)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


__all__ = ["unet_diffusers_names", "unet_key_map", "text_key_map", "text_prefixes", "random_lora", "save_lora",
           "UNET_PREFIXES", "TEXT_PREFIXES", "STYLES"]
