"""Conditioning nodes: combine, concat, average, zero out, time ranges, areas, masks, and
regional prompts from a layout of boxes. Same inputs (names, order, ranges) as ComfyUI's
Conditioning* nodes, which run headless through these specs (CORE_NODES)."""
from __future__ import annotations

from ldm_core.conditioning import cond, layout

from .context import NodeContext
from .loader_nodes import LAYOUT_ENCODER
from .socket_types import MASK, MAX_RESOLUTION, Sockets
from .spec_helpers import combo, integer, node, number, out, socket, text

# core id: (our id, core display name, core category, core input names in ComfyUI's order)
CORE_NODES = {
    "ConditioningCombine": ("LDMConditioningCombine", "Conditioning (Combine)", "conditioning",
                            ("conditioning_1", "conditioning_2")),
    "ConditioningAverage": ("LDMConditioningAverage", "ConditioningAverage", "conditioning",
                            ("conditioning_to", "conditioning_from", "conditioning_to_strength")),
    "ConditioningConcat": ("LDMConditioningConcat", "Conditioning (Concat)", "conditioning",
                           ("conditioning_to", "conditioning_from")),
    "ConditioningSetArea": ("LDMConditioningSetArea", "Conditioning (Set Area)", "conditioning",
                            ("conditioning", "width", "height", "x", "y", "strength")),
    "ConditioningSetAreaPercentage": ("LDMConditioningSetAreaPercentage", "Conditioning (Set Area with Percentage)",
                                      "conditioning", ("conditioning", "width", "height", "x", "y", "strength")),
    "ConditioningSetAreaStrength": ("LDMConditioningSetAreaStrength", "ConditioningSetAreaStrength", "conditioning",
                                    ("conditioning", "strength")),
    "ConditioningSetMask": ("LDMConditioningSetMask", "Conditioning (Set Mask)", "conditioning",
                            ("conditioning", "mask", "strength", "set_cond_area")),
    "ConditioningZeroOut": ("LDMConditioningZeroOut", "ConditioningZeroOut", "advanced/conditioning",
                            ("conditioning",)),
    "ConditioningSetTimestepRange": ("LDMConditioningSetTimestepRange", "ConditioningSetTimestepRange",
                                     "advanced/conditioning", ("conditioning", "start", "end")),
}

LAYOUT_HELP = ("One object a line: `prompt | x0 y0 x1 y1` (top-left, bottom-right corner) and optionally "
               "`| strength`. Corners as fractions (0.1 0.2 0.5 0.9), percentages (10% 20% 50% 90%) or pixels "
               "(any value above 1, or 128px). `#` starts a comment.")


def combine(ctx: NodeContext, conditioning_1, conditioning_2):
    return (cond.combine(conditioning_1, conditioning_2),)


def average(ctx: NodeContext, conditioning_to, conditioning_from, conditioning_to_strength: float):
    return (cond.average(conditioning_to, conditioning_from, conditioning_to_strength),)


def concat(ctx: NodeContext, conditioning_to, conditioning_from):
    return (cond.concat(conditioning_to, conditioning_from),)


def set_area(ctx: NodeContext, conditioning, width: int, height: int, x: int, y: int, strength: float):
    return (cond.set_area(conditioning, width, height, x, y, strength),)


def set_area_percentage(ctx: NodeContext, conditioning, width: float, height: float, x: float, y: float,
                        strength: float):
    return (cond.set_area_percentage(conditioning, width, height, x, y, strength),)


def set_area_strength(ctx: NodeContext, conditioning, strength: float):
    return (cond.set_area_strength(conditioning, strength),)


def set_mask(ctx: NodeContext, conditioning, mask, strength: float, set_cond_area: str):
    return (cond.set_mask(conditioning, mask, strength, set_cond_area),)


def zero_out(ctx: NodeContext, conditioning):
    return (cond.zero_out(conditioning),)


def set_timestep_range(ctx: NodeContext, conditioning, start: float, end: float):
    return (cond.set_timestep_range(conditioning, start, end),)


def layout_prompts(ctx: NodeContext, clip, layout_text: str, global_prompt: str = "", strength: float = 1.0):
    if clip is None:
        raise ValueError("clip input is empty: the checkpoint has no text encoder; "
                         "load one with a text-encoder loader")
    objects = layout.parse_layout(layout_text)
    return (layout.regional_conditioning(clip.encode, objects, global_prompt, strength),)


def layout_encode(ctx: NodeContext, layout_encoder, layout_text: str, classes: str, width: int, height: int):
    if layout_encoder is None:
        raise ValueError("layout_encoder input is empty: load a box-layout model (layout2img) checkpoint")
    names = [n.strip() for n in classes.replace(",", "\n").splitlines()]
    if not any(names):  # empty: the vocabulary the model carries (the embedded model's "red circle", ...)
        names = list(layout_encoder.config.classes)
    return ([layout.encode_layout_text(layout_encoder, layout_text, names, width, height)],)


def _strength(tooltip: str):
    return number("strength", 1.0, 0.0, 10.0, 0.01, tooltip)


def specs(s: Sockets, core: bool = False) -> list:
    c = s.conditioning
    conditioning = socket("conditioning", c)
    result = [out(c, "CONDITIONING")]
    px = dict(step=8)
    return [
        node("LDMConditioningCombine", "Conditioning Combine (LDM)", "conditioning", combine,
             [socket("conditioning_1", c), socket("conditioning_2", c)], result,
             "Both conditionings' entries: the model runs on each, and their predictions are averaged by weight."),
        node("LDMConditioningAverage", "Conditioning Average (LDM)", "conditioning", average,
             [socket("conditioning_to", c), socket("conditioning_from", c, "Only its first entry is used."),
              number("conditioning_to_strength", 1.0, 0.0, 1.0, 0.01, "1: all `to`; 0: all `from`.")], result,
             "Mixes two prompts' token embeddings: w·to + (1 − w)·from (`from` cut or zero-padded to `to`'s length)."),
        node("LDMConditioningConcat", "Conditioning Concat (LDM)", "conditioning", concat,
             [socket("conditioning_to", c), socket("conditioning_from", c, "Only its first entry is used.")], result,
             "Appends `from`'s tokens to each `to` entry: one attention over both prompts."),
        node("LDMConditioningSetArea", "Conditioning Set Area (LDM)", "conditioning", set_area,
             [conditioning,
              integer("width", 64, 64, MAX_RESOLUTION, "Area width in pixels (multiple of 8).", **px),
              integer("height", 64, 64, MAX_RESOLUTION, "Area height in pixels (multiple of 8).", **px),
              integer("x", 0, 0, MAX_RESOLUTION, "Left edge in pixels.", **px),
              integer("y", 0, 0, MAX_RESOLUTION, "Top edge in pixels.", **px),
              _strength("Weight where this entry overlaps others.")], result,
             "Applies the prompt only inside a rectangle; its inner edges blend over up to 8 latent cells."),
        node("LDMConditioningSetAreaPercentage", "Conditioning Set Area Percentage (LDM)", "conditioning",
             set_area_percentage,
             [conditioning, number("width", 1.0, 0.0, 1.0, 0.01, "Fraction of the image width."),
              number("height", 1.0, 0.0, 1.0, 0.01, "Fraction of the image height."),
              number("x", 0.0, 0.0, 1.0, 0.01, "Left edge, fraction of the width."),
              number("y", 0.0, 0.0, 1.0, 0.01, "Top edge, fraction of the height."),
              _strength("Weight where this entry overlaps others.")], result,
             "Applies the prompt only inside a rectangle given as fractions of the image."),
        node("LDMConditioningSetAreaStrength", "Conditioning Set Area Strength (LDM)", "conditioning",
             set_area_strength, [conditioning, _strength("Weight where this entry overlaps others.")], result,
             "Sets the weight of the entries where they overlap others."),
        node("LDMConditioningSetMask", "Conditioning Set Mask (LDM)", "conditioning", set_mask,
             [conditioning, socket("mask", MASK, "Where the prompt applies (resized to the latent)."),
              _strength("Scales the mask."),
              combo("set_cond_area", cond.SET_COND_AREA,
                    "mask bounds: run the model only on the mask's bounding box (faster, full attention there).")],
             result, "Applies the prompt with a per-pixel weight from a mask."),
        node("LDMConditioningZeroOut", "Conditioning Zero Out (LDM)", "conditioning", zero_out,
             [conditioning], result, "The same entries with all-zero embeddings and pooled vectors."),
        node("LDMConditioningSetTimestepRange", "Conditioning Set Timestep Range (LDM)", "conditioning",
             set_timestep_range,
             [conditioning, number("start", 0.0, 0.0, 1.0, 0.001, "Progress where it starts applying (0: first step)."),
              number("end", 1.0, 0.0, 1.0, 0.001, "Progress where it stops applying (1: last step).")], result,
             "Applies the prompt only during part of the sampling run, measured on the model's noise schedule."),
        node("LDMLayoutPrompts", "Layout Prompts from Boxes (LDM)", "conditioning", layout_prompts,
             [socket("clip", s.clip, "The text encoder."),
              text("layout_text", "a red circle | 0.1 0.1 0.45 0.45\na blue square | 0.55 0.5 0.95 0.9",
                   LAYOUT_HELP, multiline=True),
              text("global_prompt", "", "Prompt for the whole image (empty: none).", multiline=True),
              _strength("Default weight of each box where boxes overlap.")], result,
             "Regional prompts: one conditioning entry per box, restricted to its area, plus a global prompt."),
        node("LDMLayoutEncode", "Box Layout Encode (LDM)", "conditioning", layout_encode,
             [socket("layout_encoder", LAYOUT_ENCODER, "The box-layout encoder τθ of a layout-to-image model."),
              text("layout_text", "person | 0.1 0.2 0.45 0.95\ndog | 0.5 0.6 0.9 0.95",
                   "One object a line: `class | x0 y0 x1 y1` (class name from `classes`, or a class id).",
                   multiline=True),
              text("classes", "", "The model's class names, one a line (or comma-separated), in id order; "
                   "empty: the names the checkpoint carries.",
                   multiline=True),
              integer("width", 256, 8, MAX_RESOLUTION, "Image width, for boxes given in pixels.", step=8),
              integer("height", 256, 8, MAX_RESOLUTION, "Image height, for boxes given in pixels.", step=8)],
             result, "Layout-to-image conditioning: class and corner tokens per box, encoded by the model's "
                     "transformer (Rombach et al. 2022, §4.3)."),
    ]
