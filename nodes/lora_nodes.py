"""LoRA loader nodes, with ComfyUI's LoraLoader / LoraLoaderModelOnly inputs and semantics.

The models that come in are left as they are (the graph caches them): the outputs are new
views of the same weights that carry the LoRA's patches, merged only while they run.
"""
from __future__ import annotations

from ldm_core.lora import weight_patch as lora

from .context import NodeContext
from .socket_types import Sockets
from .spec_helpers import combo, node, number, out, socket

CORE_NODES = {
    "LoraLoader": ("LDMLoraLoader", "Load LoRA", "loaders",
                   ("model", "clip", "lora_name", "strength_model", "strength_clip")),
    "LoraLoaderModelOnly": ("LDMLoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders",
                            ("model", "lora_name", "strength_model")),
}


def _loras(ctx):
    return ctx.list_models("loras") if ctx is not None else []


def _result(result, outputs: tuple):
    """The outputs, plus the report as UI text when some of the file was not applied."""
    if result.report.unmatched:
        return {"ui": {"text": [result.report.summary()]}, "result": outputs}
    return outputs


def load_lora(ctx: NodeContext, model, clip, lora_name: str, strength_model: float = 1.0,
              strength_clip: float = 1.0):
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    if model is None and clip is None:
        raise ValueError("model and clip inputs are both empty: connect a checkpoint loader's outputs")
    result = lora.apply_lora(model, clip, ctx.model_path("loras", lora_name), strength_model, strength_clip)
    return _result(result, (result.model, result.clip))


def load_lora_model_only(ctx: NodeContext, model, lora_name: str, strength_model: float = 1.0):
    if strength_model == 0:
        return (model,)
    result = lora.apply_lora(model, None, ctx.model_path("loras", lora_name), strength_model, 0.0)
    return _result(result, (result.model,))


def _strength(name: str, what: str):
    return number(name, 1.0, -100.0, 100.0, 0.01, f"How strongly to change the {what}: W' = W + s·(α/r)·up·down. "
                  "Negative values push the other way; 0 leaves it unchanged.")


def specs(s: Sockets, core: bool = False) -> list:
    name = combo("lora_name", _loras, "The LoRA / LoCon / LoHa / LoKr file (models/loras).",
                 choices_source=lambda ctx: ctx.models_searched("loras"))
    return [
        node("LDMLoraLoader", "Load LoRA (LDM)", "loaders", load_lora,
             [socket("model", s.model, "The diffusion model to patch."),
              socket("clip", s.clip, "The text encoder(s) to patch."),
              name, _strength("strength_model", "diffusion model"), _strength("strength_clip", "text encoder")],
             [out(s.model, "MODEL", "The patched diffusion model (the input stays unchanged)."),
              out(s.clip, "CLIP", "The patched text encoder (the input stays unchanged).")],
             "Applies a LoRA (kohya, LyCORIS or diffusers/PEFT naming) to the UNet and text encoder. "
             "Chain several to stack them. Layers the model lacks are reported, never ignored silently."),
        node("LDMLoraLoaderModelOnly", "Load LoRA, Model Only (LDM)", "loaders", load_lora_model_only,
             [socket("model", s.model, "The diffusion model to patch."), name,
              _strength("strength_model", "diffusion model")],
             [out(s.model, "MODEL", "The patched diffusion model (the input stays unchanged).")],
             "Applies only the UNet part of a LoRA; its text-encoder layers are skipped."),
    ]
