"""Inpainting: the known region kept during sampling, the inpaint models' extra input, pasting back.

Three mechanisms, as in ComfyUI 0.3.64 (and the latent diffusion paper's concatenation
conditioning):

* Noise mask (any model). With m the mask resized onto the latent (1 = repaint) and z the
  clean latent, each model call sees x ← m·x + (1 − m)·(z + σ·n) and returns
  x̂0 ← m·x̂0 + (1 − m)·z, so the known region follows the forward process of the input
  and ends at z (to float rounding: the last Euler step computes x − (x − z)/σ·σ).
* Inpaint models (UNet with in_channels = latent channels + 5): the UNet input is
  [c_in·x, mask, masked-image latent], the mask rounded and resized to the latent, the
  masked image encoded from pixels set to 0.5 under the mask and scaled like any latent.
  Without an inpaint conditioning the mask is the noise mask and the masked image the
  input latent; with neither, mask = 1 and the latent of a black picture (ComfyUI's
  constants).
* Compositing in pixel space: the decoded result is pasted over the original under the
  mask, so unmasked pixels are the input's own bytes (the VAE round trip never touches them).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ldm_core.conditioning.cond import Cond
from ldm_core.imaging import mask as masks
from ldm_core.imaging.mask import MaskError
from ldm_core.networks.config import ModelConfig

# Latent of an all-zero (black) picture in the model's scaled space, per channel, as ComfyUI
# fills the masked-image input of an inpaint model that was given no picture.
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)
# How a sampler re-noises the known region (see `inpaint_noise`).
InpaintNoise = Literal["start", "seed+1"]
INPAINT_EXTRA_CHANNELS = 5  # 1 mask channel + 4 masked-image latent channels

# Cond.extra keys: the pieces InpaintModelConditioning attaches (raw VAE latent [B,4,h,w];
# pixel-space mask [B,1,H,W]) and the model-space UNet input built from them at sampling time.
CONCAT_LATENT, CONCAT_MASK, CONCAT = "concat_latent_image", "concat_mask", "concat"


def concat_channels(config: ModelConfig) -> int:
    """Extra UNet input channels beyond the latent that conditioning supplies (5 for inpainting
    models, 0 otherwise); a model's own coordinate channels are not among them."""
    return config.unet.in_channels - config.unet.out_channels - 2 * config.coord_channels


def is_inpaint_model(config: ModelConfig) -> bool:
    return concat_channels(config) == INPAINT_EXTRA_CHANNELS


# --- pixels → inpaint inputs -----------------------------------------------------------------

def _pixel_mask(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MASK resized (bilinear) to the picture: [B, 1, H, W]."""
    if pixels.ndim != 4:
        raise MaskError(f"pixels: expected an IMAGE [B, H, W, C], got shape {tuple(pixels.shape)}")
    m = masks.as_batch(mask)[:, None]
    if m.shape[0] not in (1, pixels.shape[0]):
        raise MaskError(f"mask has {m.shape[0]} entries but pixels has {pixels.shape[0]} images; "
                        "give one mask or one per image")
    return F.interpolate(m, size=pixels.shape[1:3], mode="bilinear")


def _crop(pixels: torch.Tensor, mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-crop picture and mask to multiples of the VAE factor (as VAE encoding does)."""
    h, w = pixels.shape[1] // factor * factor, pixels.shape[2] // factor * factor
    if (h, w) != tuple(pixels.shape[1:3]):
        dy, dx = (pixels.shape[1] % factor) // 2, (pixels.shape[2] % factor) // 2
        pixels = pixels[:, dy:dy + h, dx:dx + w, :]
        mask = mask[:, :, dy:dy + h, dx:dx + w]
    return pixels, mask


def grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixels under the rounded mask set to 0.5 (zero after the VAE's 2x − 1), others kept:
    p ← (p − 0.5)·(1 − round(m)) + 0.5, channel by channel. mask [B or 1, 1, H, W]."""
    keep = (1.0 - mask.round()).squeeze(1)
    out = pixels.clone()
    for c in range(3):
        out[..., c] = (out[..., c] - 0.5) * keep + 0.5
    return out


def inpaint_pixels(pixels: torch.Tensor, mask: torch.Tensor, factor: int,
                   grow_mask_by: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VAEEncodeForInpaint without the encoder: (greyed, cropped pixels [B,H,W,3],
    binary noise mask [B,1,H,W] grown by a `grow_mask_by`-wide box filter at pixel size)."""
    m = _pixel_mask(pixels, mask)
    pixels, m = _crop(pixels, m, factor)
    h, w = pixels.shape[1:3]
    if grow_mask_by == 0:
        grown = m
    else:
        box = torch.ones(1, 1, grow_mask_by, grow_mask_by)
        grown = F.conv2d(m.round(), box, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)
    return grey_out(pixels[..., :3], m), grown[:, :, :h, :w].round()


def encode_for_inpaint(vae, pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int = 6) -> dict:
    """VAEEncodeForInpaint → LATENT {"samples": E(greyed pixels), "noise_mask": grown binary mask}."""
    greyed, noise_mask = inpaint_pixels(pixels, mask, vae.factor, grow_mask_by)
    return {"samples": vae.encode(greyed), "noise_mask": noise_mask}


def inpaint_model_conditioning(positive: Sequence[Cond], negative: Sequence[Cond], vae, pixels: torch.Tensor,
                               mask: torch.Tensor, noise_mask: bool = True) -> tuple[list[Cond], list[Cond], dict]:
    """InpaintModelConditioning: both sides get the masked-image latent and the pixel mask;
    the LATENT is the encoded original (with the soft pixel mask as noise mask if asked)."""
    m = _pixel_mask(pixels, mask)
    cropped, m = _crop(pixels, m, vae.factor)
    concat_latent = vae.encode(grey_out(cropped[..., :3], m))
    latent = {"samples": vae.encode(pixels[..., :3])}
    if noise_mask:
        latent["noise_mask"] = m
    extra = {CONCAT_LATENT: concat_latent, CONCAT_MASK: m}
    return ([c.with_extra(**extra) for c in positive], [c.with_extra(**extra) for c in negative], latent)


# --- the UNet's extra input --------------------------------------------------------------------

def _fit(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Bilinear (centre-cropped to aspect) to the latent's h×w when it differs."""
    if tuple(t.shape[-2:]) != tuple(shape[-2:]):
        from ldm_core.imaging.resize import resize  # local: resize pulls in PIL, only needed here
        t = resize(t, shape[-1], shape[-2], "bilinear", "center")
    return t


def concat_input(config: ModelConfig, cond: Cond, shape: Sequence[int], latent: torch.Tensor | None,
                 denoise_mask: torch.Tensor | None) -> torch.Tensor:
    """The inpaint UNet's extra channels for one conditioning entry: [B, 5, h, w] =
    [mask, masked-image latent] in the model's scaled space.

    shape: the latent [B, C, h, w]; latent: the clean input latent in model space;
    denoise_mask: the noise mask already on the latent ([B, C, h, w]) or None.
    """
    b = shape[0]
    m = cond.extra.get(CONCAT_MASK, denoise_mask)
    if m is None:
        image = torch.ones(b, 4, *shape[2:]) * torch.tensor(BLANK_INPAINT_LATENT).reshape(1, 4, 1, 1)
        return torch.cat([torch.ones(b, 1, *shape[2:]), image], dim=1)
    image = cond.extra.get(CONCAT_LATENT)
    image = latent if image is None else image.float() * config.latent_scale
    if image is None:
        raise MaskError("inpaint model: a mask without a latent to pair it with")
    image = masks.resize_to_batch(_fit(image.float().cpu(), shape), b)
    m = m.float().cpu()
    if m.ndim == len(shape):
        m = m[:, :1]
    m = _fit(m.reshape(-1, 1, *m.shape[-2:]), shape)
    m = masks.resize_to_batch(m.round(), b)
    return torch.cat([m, image], dim=1)


def with_concat(config: ModelConfig, conds: Sequence[Cond], shape: Sequence[int], latent: torch.Tensor | None,
                denoise_mask: torch.Tensor | None) -> list[Cond]:
    """Each entry with extra["concat"] set for an inpaint model; entries unchanged for others.
    An entry that already carries a "concat" tensor keeps it."""
    if not is_inpaint_model(config):
        extra = concat_channels(config)
        if extra and not all(CONCAT in c.extra for c in conds):
            raise MaskError(f"this model takes {extra} extra input channels that are not an inpainting "
                            "mask + image; give its conditioning a 'concat' tensor")
        return list(conds)
    return [c if CONCAT in c.extra else c.with_extra(**{CONCAT: concat_input(config, c, shape, latent, denoise_mask)})
            for c in conds]


# --- known region during sampling ----------------------------------------------------------

class KnownRegion:
    """A D(x, σ) that inpaints: outside the mask the input follows z + σ·n and the output is z.

    denoiser: the guided D(x, σ); latent z and noise n in model space [B, C, h, w];
    mask [B, C, h, w] on the latent (1 = repaint). As ComfyUI's KSamplerX0Inpaint.
    """

    def __init__(self, denoiser, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> None:
        self.denoiser, self.latent, self.noise, self.mask = denoiser, latent, noise, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - self.mask
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x = x * self.mask + (self.noise * s + self.latent) * keep
        out = self.denoiser(x, sigma)
        return out * self.mask + self.latent * keep


def inpaint_noise(rule: InpaintNoise, shape: Sequence[int], seed: int, noise: torch.Tensor) -> torch.Tensor:
    """Noise for re-noising the known region, by the sampler's rule (its `inpaint_noise` trait in
    the sampler table): "start", the sampling's start noise itself; "seed+1", a fresh draw from
    seed + 1 (ComfyUI runs "ddim" as Euler with that draw there)."""
    if rule == "start":
        return noise
    if rule != "seed+1":
        raise ValueError(f"inpaint noise rule must be 'start' or 'seed+1', got {rule!r}")
    generator = torch.Generator("cpu").manual_seed(int(seed) + 1)
    return torch.randn(list(shape), generator=generator, dtype=torch.float32)


# --- pasting back ---------------------------------------------------------------------------

def composite_result(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor,
                     feather: int = 0) -> torch.Tensor:
    """Paste the decoded result over the original picture under the mask, in pixel space.

    out = original where the mask is 0 (the very same values), generated where it is 1,
    (1 − m)·original + m·generated between. `feather` softens the mask's edge inward over
    that many pixels (see mask.feather_inward), so unmasked pixels stay untouched. A result
    smaller than the original (the VAE crops to multiples of 8) is placed at the centre-crop
    offset; the border it does not cover keeps the original. IMAGE [B, H, W, C] out.
    """
    if original.ndim != 4 or generated.ndim != 4:
        raise MaskError("image and generated must be IMAGE tensors [B, H, W, C]")
    H, W = original.shape[1:3]
    h, w = generated.shape[1:3]
    if h > H or w > W:
        raise MaskError(f"generated picture ({w}x{h}) is larger than the original ({W}x{H}); "
                        "composite onto the picture the latent was encoded from")
    b = max(original.shape[0], generated.shape[0])
    original = masks.repeat_to_batch(original, b)
    generated = masks.repeat_to_batch(generated[..., :original.shape[-1]], b)
    m = masks.as_batch(mask, "mask")
    if tuple(m.shape[-2:]) != (H, W):
        m = F.interpolate(m[:, None], size=(H, W), mode="bilinear")[:, 0]
    m = masks.repeat_to_batch(masks.feather_inward(m, feather), b).clamp(0, 1)
    dy, dx = (H - h) // 2, (W - w) // 2
    placed = original.clone()
    placed[:, dy:dy + h, dx:dx + w, :generated.shape[-1]] = generated
    inside = torch.zeros_like(m)
    inside[:, dy:dy + h, dx:dx + w] = 1
    m = (m * inside)[..., None]  # no generated pixels outside the box: keep the original there
    blend = original * (1 - m) + placed * m
    out = torch.where(m == 0, original, torch.where(m == 1, placed, blend))
    return out
