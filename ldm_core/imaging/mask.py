"""MASK operations, in ComfyUI's convention: float32 [B, H, W] (or [H, W]) in 0..1, 1 = repaint.

Grow/shrink (grey dilation/erosion), edge feathering, padding for outpainting, masked
compositing of images, and resizing a mask onto a latent. Where a ComfyUI core node
exists the numbers are the same as its (tests pin them against recorded outputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ldm_core.errors import LdmError


class MaskError(LdmError, ValueError):
    """A mask or image of an unusable shape; the message names the input and what to do."""


def as_batch(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """Any [..., H, W] mask as [B, H, W] float32 (a [H, W] mask becomes a batch of one)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        raise MaskError(f"{what}: expected a MASK tensor [B, H, W] or [H, W], got "
                        f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1]).float()


def repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """First `batch` entries of `t` cycled (ComfyUI's repeat_to_batch_size): [n, ...] → [batch, ...]."""
    n = t.shape[0]
    if n > batch:
        return t[:batch]
    if n < batch:
        return t.repeat(math.ceil(batch / n), *([1] * (t.ndim - 1)))[:batch]
    return t


def resize_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's resize_to_batch_size: spread n entries evenly over `batch` (nearest index)."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch <= 1:
        return t[:batch]
    if batch < n:
        scale = (n - 1) / (batch - 1)
        index = [min(round(i * scale), n - 1) for i in range(batch)]
    else:
        scale = n / batch
        index = [min(math.floor((i + 0.5) * scale), n - 1) for i in range(batch)]
    return t[index]


# --- grow / shrink -----------------------------------------------------------------

def _neighbourhood(m: torch.Tensor, tapered: bool, reduce) -> torch.Tensor:
    """One 3×3 grey morphology step on [B, H, W]: max (dilation) or min (erosion) over the
    square, or over the cross (centre + 4 neighbours) when tapered. Edges replicate, which is
    what a reflecting border gives for a 3×3 window: the outside copies are already inside."""
    p = F.pad(m[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    h, w = m.shape[-2:]
    offsets = [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)]
    if not tapered:
        offsets += [(0, 0), (0, 2), (2, 0), (2, 2)]
    views = torch.stack([p[:, dy:dy + h, dx:dx + w] for dy, dx in offsets])
    return reduce(views, dim=0).values


def grow(mask: torch.Tensor, expand: int, tapered_corners: bool = True) -> torch.Tensor:
    """GrowMask: `expand` > 0 dilates, < 0 erodes, |expand| steps of a 3×3 window each.

    Grey morphology: out(p) = max (or min) of the mask over the window around p, so soft masks
    keep their values. tapered_corners uses the cross-shaped window (a diamond after many
    steps), otherwise the square (a square). Returns [B, H, W].
    """
    out = as_batch(mask)
    reduce = torch.max if expand > 0 else torch.min
    for _ in range(abs(int(expand))):
        out = _neighbourhood(out, tapered_corners, reduce)
    return out


# --- feathering --------------------------------------------------------------------

def feather(mask: torch.Tensor, left: int, top: int, right: int, bottom: int, *,
            comfy_edges: bool = False) -> torch.Tensor:
    """FeatherMask: fade the mask linearly towards the image edges named by a width in pixels.

    Column k (0-based) from the left edge is multiplied by (k + 1)/left, likewise for the
    other edges, so the outermost line keeps 1/n and line n − 1 keeps all of it.
    `comfy_edges=True` reproduces ComfyUI 0.3.64 exactly, whose right and bottom ramps are off
    by one line (its index −0 is line 0: the first column/row gets an extra 1/n factor, the
    last one 2/n instead of 1/n); the core-node mapping uses it, our node the symmetric ramp.
    """
    out = as_batch(mask).clone()
    h, w = out.shape[-2:]
    left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
    for k in range(left):
        out[:, :, k] *= (k + 1.0) / left
    for k in range(right):
        out[:, :, -k if comfy_edges else w - 1 - k] *= (k + 1) / right
    for k in range(top):
        out[:, k, :] *= (k + 1) / top
    for k in range(bottom):
        out[:, -k if comfy_edges else h - 1 - k, :] *= (k + 1) / bottom
    return out


def feather_inward(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Soften a mask's edge inside the mask only: m_f = (1/n)·Σ_{k<n} erode^k(m), n = `width`.

    For a binary mask this is min(d, n)/n with d the (chessboard) distance in pixels to the
    nearest unmasked pixel, so the edge ramps up over n pixels and every pixel where the mask
    is 0 stays exactly 0 (the image border counts as inside, not as an edge). Returns [B, H, W].
    """
    m = as_batch(mask)
    if width <= 0:
        return m
    total = torch.zeros_like(m)
    eroded = m
    for _ in range(width):
        total += eroded
        eroded = _neighbourhood(eroded, False, torch.min)
    return total / width


# --- outpainting -------------------------------------------------------------------

def pad_for_outpaint(image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ImagePadForOutpaint: grow the canvas with grey (0.5) borders; mask = 1 on the new area.

    Inside the original picture the mask is 0, except within `feathering` pixels of a padded
    side, where it is ((f − d)/f)² with d the distance to the nearest padded side (sides not
    padded do not count). No feathering unless 2f is smaller than both picture sides.
    Returns IMAGE [B, H + top + bottom, W + left + right, C] and MASK [1, H', W'].
    """
    if image.ndim != 4:
        raise MaskError(f"image: expected an IMAGE [B, H, W, C], got shape {tuple(image.shape)}")
    b, h, w, c = image.shape
    canvas = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
    canvas[:, top:top + h, left:left + w, :] = image
    mask = torch.ones(h + top + bottom, w + left + right, dtype=torch.float32)
    inner = torch.zeros(h, w, dtype=torch.float32)
    if 0 < feathering and feathering * 2 < h and feathering * 2 < w:
        i = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
        j = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
        far_h, far_w = torch.full_like(i, h), torch.full_like(j, w)
        d = torch.stack([i if top else far_h, h - i if bottom else far_h,
                         j if left else far_w, w - j if right else far_w]).amin(dim=0)
        v = (feathering - d) / feathering  # float64 like the reference, rounded once to float32
        inner = torch.where(d < feathering, v * v, torch.zeros_like(v)).float()
    mask[top:top + h, left:left + w] = inner
    return canvas, mask[None]


# --- compositing -------------------------------------------------------------------

def composite_images(destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                     resize_source: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ImageCompositeMasked: paste `source` onto `destination` with its top-left corner at (x, y).

    out = mask·source + (1 − mask)·destination over the overlap, destination elsewhere. The mask
    is resized (bilinear) to the source size; the source is resized to the destination size
    when `resize_source`. Batches are cycled to the destination's. An RGB destination with an
    RGBA source drops the alpha; an RGBA destination gets an opaque alpha added to an RGB source
    the other way round. IMAGE tensors [B, H, W, C] in, [B, H, W, C] out.
    """
    if destination.ndim != 4 or source.ndim != 4:
        raise MaskError("destination and source must be IMAGE tensors [B, H, W, C]")
    if x < 0 or y < 0:
        raise MaskError(f"x and y must be ≥ 0, got x={x}, y={y}")
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        destination = F.pad(destination, (0, 1))
        destination[..., -1] = 1.0
    dst = destination.clone().movedim(-1, 1)
    src = source.movedim(-1, 1)
    if resize_source:
        src = F.interpolate(src, size=dst.shape[-2:], mode="bilinear")
    src = repeat_to_batch(src, dst.shape[0])
    x, y = min(x, dst.shape[-1]), min(y, dst.shape[-2])
    bottom, right = y + src.shape[-2], x + src.shape[-1]
    if mask is None:
        m = torch.ones_like(src)
    else:
        m = F.interpolate(as_batch(mask)[:, None], size=src.shape[-2:], mode="bilinear")
        m = repeat_to_batch(m, src.shape[0])
    vis_w, vis_h = dst.shape[-1] - x, dst.shape[-2] - y
    m = m[:, :, :vis_h, :vis_w]
    pasted = m * src[..., :vis_h, :vis_w] + (torch.ones_like(m) - m) * dst[..., y:bottom, x:right]
    dst[..., y:bottom, x:right] = pasted
    return dst.movedim(1, -1)


# --- onto latents ------------------------------------------------------------------

def to_latent(mask: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A noise mask resized onto a latent of `shape` [B, C, h, w] as ComfyUI's sampler does:
    bilinear to (h, w) (align_corners=False, no antialias), repeated over the C channels and
    cycled over the batch. Returns [B, C, h, w]."""
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    m = F.interpolate(m, size=tuple(shape[2:]), mode="bilinear")
    if m.shape[1] < shape[1]:
        m = m.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    return repeat_to_batch(m, shape[0])
