"""Image nodes: load from the input folder, save and preview, scale."""
from __future__ import annotations

import hashlib
import json
import secrets

from ldm_core.imaging import image_io, resize

from .context import NodeContext
from .socket_types import IMAGE, MASK, MAX_RESOLUTION, Sockets
from .spec_helpers import combo, integer, node, out, socket, text

# ComfyUI core ids → ours: (our id, core display name, core category, core input names in order).
CORE_NODES = {
    "LoadImage": ("LDMLoadImage", "Load Image", "image", ("image",)),
    "SaveImage": ("LDMSaveImage", "Save Image", "image", ("images", "filename_prefix")),
    "PreviewImage": ("LDMPreviewImage", "Preview Image", "image", ("images",)),
    "ImageScale": ("LDMImageScale", "Upscale Image", "image/upscaling", (
        "image", "upscale_method", "width", "height", "crop")),
}


def _inputs(ctx):
    return ctx.list_inputs() if ctx is not None else []


def load(ctx: NodeContext, image: str):
    return image_io.load_image(ctx.input_path(image))


def load_changed(ctx: NodeContext, image: str) -> str:
    """The file's content hash: an edited input image re-runs the node and what follows."""
    return hashlib.sha256(ctx.input_path(image).read_bytes()).hexdigest()


def _metadata(prompt, extra_pnginfo) -> dict[str, str]:
    meta = {}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        meta[key] = json.dumps(value)
    return meta


def _prefix_problem(prefix: str, ctx: NodeContext | None) -> str | None:
    """Why `prefix` cannot name saved files (it leaves the output folder), found before the graph runs."""
    try:
        image_io.resolve_prefix(ctx.output_dir if ctx is not None else "output", prefix)
    except image_io.OutputPathError as e:
        return str(e)
    return None


def save(ctx: NodeContext, images, filename_prefix: str = "ComfyUI", prompt=None, extra_pnginfo=None):
    results = image_io.save_images(images, ctx.output_dir, filename_prefix, _metadata(prompt, extra_pnginfo))
    return {"ui": {"images": results}, "result": ()}


def preview(ctx: NodeContext, images, prompt=None, extra_pnginfo=None):
    prefix = "preview_" + secrets.token_hex(3)
    results = image_io.save_images(images, ctx.output_folder("", temp=True), prefix, _metadata(prompt, extra_pnginfo))
    return {"ui": {"images": [dict(r, type="temp") for r in results]}, "result": ()}


def scale(ctx: NodeContext, image, upscale_method: str, width: int, height: int, crop: str):
    return (resize.scale_image(image, upscale_method, width, height, crop),)


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMLoadImage", "Load Image (LDM)", "image", load,
             [combo("image", _inputs, "A picture in the input folder.", image_upload=True,
                    choices_source=lambda ctx: ctx.inputs_searched())],
             [out(IMAGE, "IMAGE"), out(MASK, "MASK", "1 − alpha (where the picture is transparent).")],
             "Loads a picture from the input folder as IMAGE and MASK.", is_changed=load_changed),
        node("LDMSaveImage", "Save Image (LDM)", "image", save,
             [socket("images", IMAGE, "The images to save."),
              text("filename_prefix", "ComfyUI", "Name prefix; may contain subfolders and %width%, %date%-style fields.",
                   check=_prefix_problem)],
             [], "Saves PNGs into the output folder with the workflow embedded.", output_node=True,
             hidden=("prompt", "extra_pnginfo")),
        node("LDMPreviewImage", "Preview Image (LDM)", "image", preview,
             [socket("images", IMAGE)], [], "Shows images without keeping them (temp folder).", output_node=True,
             hidden=("prompt", "extra_pnginfo")),
        node("LDMImageScale", "Scale Image (LDM)", "image", scale,
             [socket("image", IMAGE), combo("upscale_method", resize.IMAGE_METHODS),
              integer("width", 512, 0, MAX_RESOLUTION, "Target width (0: keep aspect)."),
              integer("height", 512, 0, MAX_RESOLUTION, "Target height (0: keep aspect)."),
              combo("crop", resize.CROP_METHODS)],
             [out(IMAGE, "IMAGE")], "Resizes images."),
    ]
