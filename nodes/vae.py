"""VAE nodes: pixels ↔ latents."""
from __future__ import annotations

from ._engine import engine
from .context import NodeContext
from .spec_helpers import node, out, socket
from .types import IMAGE, LATENT, Sockets

latents = engine("latent")


def _need(vae):
    if vae is None:
        raise ValueError("vae input is empty: the checkpoint has no VAE; load one with a VAE loader")
    return vae


def decode(ctx: NodeContext, samples: dict, vae):
    return (_need(vae).decode(latents.check(samples, "samples")),)


def encode(ctx: NodeContext, pixels, vae):
    return ({"samples": _need(vae).encode(pixels[..., :3])},)


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMVAEDecode", "VAE Decode (LDM)", "vae", decode,
             [socket("samples", LATENT, "The latent to decode."), socket("vae", s.vae)],
             [out(IMAGE, "IMAGE", "The decoded image.")], "Decodes latents into images: x = D(z)."),
        node("LDMVAEEncode", "VAE Encode (LDM)", "vae", encode,
             [socket("pixels", IMAGE, "Image(s) to encode; cropped to multiples of 8."), socket("vae", s.vae)],
             [out(LATENT, "LATENT", "The posterior mean E(x).")], "Encodes images into latents: z = E(x)."),
    ]
