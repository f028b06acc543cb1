"""VAE nodes: pixels ↔ latents."""
from __future__ import annotations

from ldm_core.imaging import latent as latents
from ldm_core.tiling import tiled_vae as tiling

from .context import NodeContext
from .socket_types import IMAGE, LATENT, Sockets
from .spec_helpers import combo, integer, node, out, socket

# ComfyUI's VAEDecodeTiled / VAEEncodeTiled run headless through our tiled nodes, always
# in exact mode: their overlap (and video-only temporal) inputs are accepted and unused,
# since exact tiles need no blending.
CORE_NODES = {
    "VAEDecode": ("LDMVAEDecode", "VAE Decode", "latent", ("samples", "vae")),
    "VAEEncode": ("LDMVAEEncode", "VAE Encode", "latent", ("pixels", "vae")),
    "VAEDecodeTiled": ("LDMVAEDecodeTiled", "VAE Decode (Tiled)", "_for_testing", (
        "samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap")),
    "VAEEncodeTiled": ("LDMVAEEncodeTiled", "VAE Encode (Tiled)", "_for_testing", (
        "pixels", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap")),
}


def _need(vae):
    if vae is None:
        raise ValueError("vae input is empty: the checkpoint has no VAE; load one with a VAE loader")
    return vae


def decode(ctx: NodeContext, samples: dict, vae):
    return (_need(vae).decode(latents.check(samples, "samples")),)


def encode(ctx: NodeContext, pixels, vae):
    return ({"samples": _need(vae).encode(pixels[..., :3])},)


def _tile(tile_size: int) -> int | None:
    return tile_size or None  # 0: chosen from free memory


def decode_tiled(ctx: NodeContext, samples: dict, vae, tile_size: int = 0, mode: str = "exact", **_unused):
    return (_need(vae).decode_tiled(latents.check(samples, "samples"), _tile(tile_size), mode),)


def encode_tiled(ctx: NodeContext, pixels, vae, tile_size: int = 0, mode: str = "exact", **_unused):
    return ({"samples": _need(vae).encode_tiled(pixels[..., :3], _tile(tile_size), mode)},)


MODE_TIP = ("exact: the same image as untiled (whole-image GroupNorm statistics, gathered layer by layer); "
            "fast: one pass per tile with statistics estimated once (approximate; keeps no whole maps "
            "between layers, but recomputes wide halos: slower than exact on a CPU)")


def _tiled_inputs(core: bool, step: int) -> list:
    """tile_size (+ mode ours; + ComfyUI's overlap/temporal inputs, accepted and unused, in core clothing)."""
    if core:  # ComfyUI's widgets and ranges, so its saved workflows validate unchanged
        return [integer("tile_size", 512, 64, 4096, "Tile side in pixels.", step=step),
                integer("overlap", 64, 0, 4096, "Unused: exact tiles need no overlap.", step=32),
                integer("temporal_size", 64, 8, 4096, "Only for video VAEs; unused.", step=4),
                integer("temporal_overlap", 8, 4, 4096, "Only for video VAEs; unused.", step=4)]
    return [integer("tile_size", 0, 0, 4096, "Tile side in image pixels of the full-resolution layers; "
                    "0 picks it from free memory. Smaller tiles use less memory.", step=32),
            combo("mode", tiling.MODES, MODE_TIP, default="exact")]


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMVAEDecode", "VAE Decode (LDM)", "vae", decode,
             [socket("samples", LATENT, "The latent to decode."), socket("vae", s.vae)],
             [out(IMAGE, "IMAGE", "The decoded image.")], "Decodes latents into images: x = D(z)."),
        node("LDMVAEEncode", "VAE Encode (LDM)", "vae", encode,
             [socket("pixels", IMAGE, "Image(s) to encode; cropped to multiples of 8."), socket("vae", s.vae)],
             [out(LATENT, "LATENT", "The posterior mean E(x).")], "Encodes images into latents: z = E(x)."),
        node("LDMVAEDecodeTiled", "VAE Decode Tiled (LDM)", "vae", decode_tiled,
             [socket("samples", LATENT, "The latent to decode."), socket("vae", s.vae), *_tiled_inputs(core, 32)],
             [out(IMAGE, "IMAGE", "The decoded image.")],
             "Decodes large latents in tiles with bounded memory. Exact mode gives the same image as "
             "VAE Decode (no seams, no colour shifts); fast mode is approximate."),
        node("LDMVAEEncodeTiled", "VAE Encode Tiled (LDM)", "vae", encode_tiled,
             [socket("pixels", IMAGE, "Image(s) to encode; cropped to multiples of 8."), socket("vae", s.vae),
              *_tiled_inputs(core, 64)],
             [out(LATENT, "LATENT", "The posterior mean E(x).")],
             "Encodes large images in tiles with bounded memory. Exact mode gives the same latent as "
             "VAE Encode; fast mode is approximate."),
    ]
