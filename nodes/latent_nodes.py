"""Latent nodes: empty latent, latent upscale."""
from __future__ import annotations

from ldm_core.imaging import latent as latents
from ldm_core.imaging import resize

from .context import NodeContext
from .socket_types import LATENT, MAX_RESOLUTION, Sockets
from .spec_helpers import combo, integer, node, number, out, socket

# ComfyUI core ids → ours: (our id, core display name, core category, core input names in order).
CORE_NODES = {
    "EmptyLatentImage": ("LDMEmptyLatentImage", "Empty Latent Image", "latent", ("width", "height", "batch_size")),
    "LatentUpscale": ("LDMLatentUpscale", "Upscale Latent", "latent", (
        "samples", "upscale_method", "width", "height", "crop")),
    "LatentUpscaleBy": ("LDMLatentUpscaleBy", "Upscale Latent By", "latent", ("samples", "upscale_method", "scale_by")),
}


def empty(ctx: NodeContext, width: int, height: int, batch_size: int = 1, vae=None):
    if vae is None:  # ComfyUI's EmptyLatentImage: 4 channels at 1/8 of the size
        return ({"samples": latents.empty(width, height, batch_size)},)
    return ({"samples": latents.empty(width, height, batch_size, vae.config.embed_dim, vae.factor)},)


def upscale(ctx: NodeContext, samples: dict, upscale_method: str, width: int, height: int, crop: str):
    return (latents.with_samples(samples, resize.upscale_latent(samples["samples"], upscale_method, width, height, crop)),)


def upscale_by(ctx: NodeContext, samples: dict, upscale_method: str, scale_by: float):
    return (latents.with_samples(samples, resize.upscale_latent_by(samples["samples"], upscale_method, scale_by)),)


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMEmptyLatentImage", "Empty Latent Image (LDM)", "latent", empty,
             [integer("width", 512, 16, MAX_RESOLUTION, "Image width in pixels.", step=8),
              integer("height", 512, 16, MAX_RESOLUTION, "Image height in pixels.", step=8),
              integer("batch_size", 1, 1, 4096, "Images per batch."),
              *([] if core else [socket("vae", s.vae, "Size the latent for this VAE (its channels and downscale "
                                        "factor, e.g. 4 for the embedded model); unconnected: 4 channels at 1/8, "
                                        "as ComfyUI's EmptyLatentImage.", optional=True)])],
             [out(LATENT, "LATENT", "Zeros [B, C, H/f, W/f] (C = 4, f = 8 unless a VAE says otherwise): sampling "
                                    "starts from pure noise.")],
             "An empty latent to generate into."),
        node("LDMLatentUpscale", "Upscale Latent (LDM)", "latent", upscale,
             [socket("samples", LATENT), combo("upscale_method", resize.LATENT_METHODS),
              integer("width", 512, 0, MAX_RESOLUTION, "Target width in pixels (0: keep aspect).", step=8),
              integer("height", 512, 0, MAX_RESOLUTION, "Target height in pixels (0: keep aspect).", step=8),
              combo("crop", resize.CROP_METHODS)],
             [out(LATENT, "LATENT")], "Resizes a latent (hires fix: upscale, then re-sample at partial denoise)."),
        node("LDMLatentUpscaleBy", "Upscale Latent By (LDM)", "latent", upscale_by,
             [socket("samples", LATENT), combo("upscale_method", resize.LATENT_METHODS),
              number("scale_by", 1.5, 0.01, 8.0, 0.01, "Scale factor.")],
             [out(LATENT, "LATENT")], "Resizes a latent by a factor."),
    ]
