"""Mask nodes: pad for outpainting, grow/shrink, feather, masked image composite."""
from __future__ import annotations

from ldm_core.imaging import mask as masks

from .context import NodeContext
from .socket_types import IMAGE, MASK, MAX_RESOLUTION, Sockets
from .spec_helpers import InputSpec, integer, node, out, socket, spec

# core id: (our id, core display name, core category, core input names in ComfyUI's order)
CORE_NODES = {
    "ImagePadForOutpaint": ("LDMImagePadForOutpaint", "Pad Image for Outpainting", "image", (
        "image", "left", "top", "right", "bottom", "feathering")),
    "GrowMask": ("LDMGrowMask", "GrowMask", "mask", ("mask", "expand", "tapered_corners")),
    "FeatherMask": ("LDMFeatherMask", "FeatherMask", "mask", ("mask", "left", "top", "right", "bottom")),
    "ImageCompositeMasked": ("LDMImageCompositeMasked", "ImageCompositeMasked", "image", (
        "destination", "source", "x", "y", "resize_source", "mask")),
}


def boolean(name: str, default: bool, tooltip: str = "", **kw):
    return InputSpec(name, spec.BOOLEAN, default, tooltip=tooltip, **kw)


def pad(ctx: NodeContext, image, left: int, top: int, right: int, bottom: int, feathering: int):
    return masks.pad_for_outpaint(image, left, top, right, bottom, feathering)


def grow(ctx: NodeContext, mask, expand: int, tapered_corners: bool):
    return (masks.grow(mask, expand, tapered_corners),)


def _feather(comfy_edges: bool):
    def feather(ctx: NodeContext, mask, left: int, top: int, right: int, bottom: int):
        return (masks.feather(mask, left, top, right, bottom, comfy_edges=comfy_edges),)
    return feather


def composite(ctx: NodeContext, destination, source, x: int, y: int, resize_source: bool, mask=None):
    return (masks.composite_images(destination, source, x, y, resize_source, mask),)


def _edge(name: str, what: str, step: int = 1):
    return integer(name, 0, 0, MAX_RESOLUTION, what, step=step)


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMImagePadForOutpaint", "Pad Image for Outpainting (LDM)", "inpaint", pad,
             [socket("image", IMAGE, "The picture to extend."),
              _edge("left", "Pixels to add on the left.", 8), _edge("top", "Pixels to add on top.", 8),
              _edge("right", "Pixels to add on the right.", 8), _edge("bottom", "Pixels to add at the bottom.", 8),
              integer("feathering", 40, 0, MAX_RESOLUTION, "Soft mask edge inside the picture, in pixels: "
                      "((f − d)/f)² at distance d from a padded side.")],
             [out(IMAGE, "IMAGE", "The picture on a larger grey (0.5) canvas."),
              out(MASK, "MASK", "1 on the new area, 0 on the picture (soft near padded sides).")],
             "Extends the canvas for outpainting and makes the matching mask."),
        node("LDMGrowMask", "Grow Mask (LDM)", "inpaint", grow,
             [socket("mask", MASK), integer("expand", 0, -MAX_RESOLUTION, MAX_RESOLUTION,
                                            "Pixels to grow (> 0) or shrink (< 0) by."),
              boolean("tapered_corners", True, "Cross-shaped steps (rounded corners) instead of square ones.")],
             [out(MASK, "MASK")], "Grows or shrinks a mask: grey dilation/erosion, one pixel per step."),
        node("LDMFeatherMask", "Feather Mask (LDM)", "inpaint", _feather(core),
             [socket("mask", MASK), _edge("left", "Fade width at the left edge."),
              _edge("top", "Fade width at the top edge."), _edge("right", "Fade width at the right edge."),
              _edge("bottom", "Fade width at the bottom edge.")],
             [out(MASK, "MASK")], "Fades a mask linearly towards the chosen image edges."),
        node("LDMImageCompositeMasked", "Image Composite Masked (LDM)", "inpaint", composite,
             [socket("destination", IMAGE), socket("source", IMAGE),
              integer("x", 0, 0, MAX_RESOLUTION, "Left edge of the source on the destination."),
              integer("y", 0, 0, MAX_RESOLUTION, "Top edge of the source on the destination."),
              boolean("resize_source", False, "Resize the source to the destination size first."),
              socket("mask", MASK, "Where the source shows (resized to the source).", optional=True)],
             [out(IMAGE, "IMAGE")], "Pastes one image onto another: mask·source + (1 − mask)·destination."),
    ]
