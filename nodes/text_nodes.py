"""Text conditioning nodes: prompt encoding and clip skip."""
from __future__ import annotations

from ldm_core.text.prompt_syntax import weight_problem

from .context import NodeContext
from .socket_types import Sockets
from .spec_helpers import integer, node, out, socket, text

# ComfyUI core ids → ours: (our id, core display name, core category, core input names in order).
CORE_NODES = {
    "CLIPTextEncode": ("LDMTextEncode", "CLIP Text Encode (Prompt)", "conditioning", ("text", "clip")),
    "CLIPSetLastLayer": ("LDMSetLastLayer", "CLIP Set Last Layer", "conditioning", ("clip", "stop_at_clip_layer")),
}


def encode(ctx: NodeContext, text: str, clip):
    if clip is None:
        raise ValueError("clip input is empty: the checkpoint has no text encoder; load one with a text-encoder loader")
    return ([clip.encode(text)],)


def set_last_layer(ctx: NodeContext, clip, stop_at_clip_layer: int):
    return (clip.with_clip_skip(stop_at_clip_layer),)


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMTextEncode", "Text Encode (LDM)", "conditioning", encode,
             [text("text", "", "The prompt. (word:1.2) weights, (word) = ×1.1, \\( escapes, embedding:name.",
                   multiline=True, check=lambda value, ctx: weight_problem(value)),
              socket("clip", s.clip, "The text encoder.")],
             [out(s.conditioning, "CONDITIONING", "τθ(prompt): cross-attention context (and pooled vector).")],
             "Encodes a prompt with the model's CLIP text encoder(s), ComfyUI prompt syntax and weighting."),
        node("LDMSetLastLayer", "Set CLIP Last Layer (LDM)", "conditioning", set_last_layer,
             [socket("clip", s.clip),
              integer("stop_at_clip_layer", -1, -24, -1, "-1: last layer; -2: penultimate (\"clip skip 2\").")],
             [out(s.clip, "CLIP")],
             "Reads the text encoder's hidden state after an earlier layer (clip skip)."),
    ]
