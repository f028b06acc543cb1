"""Inpainting nodes: noise mask, encode for inpainting, inpaint-model conditioning, paste back."""
from __future__ import annotations

from ldm_core.conditioning import inpaint
from ldm_core.imaging import latent as latents

from .context import NodeContext
from .mask_nodes import boolean
from .socket_types import IMAGE, LATENT, MASK, MAX_RESOLUTION, Sockets
from .spec_helpers import integer, node, out, socket

# core id: (our id, core display name, core category, core input names in ComfyUI's order)
CORE_NODES = {
    "SetLatentNoiseMask": ("LDMSetLatentNoiseMask", "Set Latent Noise Mask", "latent/inpaint", ("samples", "mask")),
    "VAEEncodeForInpaint": ("LDMVAEEncodeForInpaint", "VAE Encode (for Inpainting)", "latent/inpaint", (
        "pixels", "vae", "mask", "grow_mask_by")),
    "InpaintModelConditioning": ("LDMInpaintModelConditioning", "InpaintModelConditioning", "conditioning/inpaint", (
        "positive", "negative", "vae", "pixels", "mask", "noise_mask")),
}


def _need(vae):
    if vae is None:
        raise ValueError("vae input is empty: the checkpoint has no VAE; load one with a VAE loader")
    return vae


def set_noise_mask(ctx: NodeContext, samples: dict, mask):
    latents.check(samples, "samples")
    out = dict(samples)
    out["noise_mask"] = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    return (out,)


def encode_for_inpaint(ctx: NodeContext, pixels, vae, mask, grow_mask_by: int = 6):
    return (inpaint.encode_for_inpaint(_need(vae), pixels, mask, grow_mask_by),)


def model_conditioning(ctx: NodeContext, positive, negative, vae, pixels, mask, noise_mask: bool = True):
    return inpaint.inpaint_model_conditioning(positive, negative, _need(vae), pixels, mask, noise_mask)


def composite(ctx: NodeContext, image, generated, mask, feather: int = 0):
    return (inpaint.composite_result(image, generated, mask, feather),)


def specs(s: Sockets, core: bool = False) -> list:
    return [
        node("LDMSetLatentNoiseMask", "Set Latent Noise Mask (LDM)", "inpaint", set_noise_mask,
             [socket("samples", LATENT), socket("mask", MASK, "1 = repaint; resized onto the latent when sampling.")],
             [out(LATENT, "LATENT", "The latent with a noise mask: sampling keeps the region outside it.")],
             "Limits sampling to the masked region; the rest is re-imposed from this latent at every step."),
        node("LDMVAEEncodeForInpaint", "VAE Encode for Inpainting (LDM)", "inpaint", encode_for_inpaint,
             [socket("pixels", IMAGE, "The picture; cropped to multiples of 8."), socket("vae", s.vae),
              socket("mask", MASK, "1 = repaint."),
              integer("grow_mask_by", 6, 0, 64, "Grow the noise mask by this box size (pixels) for seamless edges.")],
             [out(LATENT, "LATENT", "E(picture with the masked area set to grey), with a binary noise mask.")],
             "Encodes a picture for inpainting at full denoise: the masked area is blanked first."),
        node("LDMInpaintModelConditioning", "Inpaint Model Conditioning (LDM)", "inpaint", model_conditioning,
             [socket("positive", s.conditioning), socket("negative", s.conditioning), socket("vae", s.vae),
              socket("pixels", IMAGE, "The picture."), socket("mask", MASK, "1 = repaint."),
              boolean("noise_mask", True, "Also set the mask as the latent's noise mask (sampling only inside it).")],
             [out(s.conditioning, "positive"), out(s.conditioning, "negative"),
              out(LATENT, "latent", "E(picture), with the mask as noise mask if asked.")],
             "Gives an inpainting model (9-channel UNet) its mask and masked-picture latent through the conditioning."),
        node("LDMInpaintComposite", "Inpaint Composite (LDM)", "inpaint", composite,
             [socket("image", IMAGE, "The original picture (as given to the encoder)."),
              socket("generated", IMAGE, "The decoded result."), socket("mask", MASK, "1 = take the result."),
              integer("feather", 0, 0, MAX_RESOLUTION, "Soften the mask edge over this many pixels, inside the mask.")],
             [out(IMAGE, "IMAGE", "The original where the mask is 0 (bit-identical), the result under it.")],
             "Pastes the inpainted result back over the original so the unmasked area is untouched by the VAE."),
    ]
