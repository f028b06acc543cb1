"""Resizing of latents and images, numerically matching ComfyUI's upscale nodes.

`resize` is the one engine function; the four node-level helpers below it only work
out the target size the way ComfyUI's LatentUpscale, LatentUpscaleBy, ImageScale and
ImageScaleBy do and then call it.

Methods:
  * "nearest-exact", "bilinear", "area", "bicubic": `torch.nn.functional.interpolate`
    with its defaults (align_corners=False, no antialias; "area" is adaptive average
    pooling).
  * "bislerp": bilinear sampling in which each pair of neighbouring channel vectors
    is blended by spherical interpolation of their directions, with the norms blended
    linearly; applied along W, then along H, in float32.
  * "lanczos": Pillow's LANCZOS filter on 8-bit images, so values are quantised to
    multiples of 1/255 (and truncated, not rounded, on the way in).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_core.errors import LdmError

# Orders match ComfyUI's dropdowns.
LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")

_ALL_METHODS = LATENT_METHODS + ("lanczos",)

# ComfyUI's LatentUpscale never goes below 64 pixels (8 latent cells at factor 8).
_MIN_LATENT_PIXELS = 64

# bislerp: directions closer than this (in cosine) to parallel or antiparallel are not
# slerped; parallel pairs keep the first vector, antiparallel pairs are lerped.
_DEGENERATE_COS = 1e-5


class ResizeError(LdmError, ValueError):
    """An unknown resize method or crop mode, or an impossible target size."""


def resize(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize the last two dims of `x` [B, C, H, W] to [B, C, height, width].

    Extra dims between C and H ([B, C, T, H, W], video latents) are treated as more
    batch entries. With crop="center" the input is first cropped symmetrically to
    the target aspect ratio. The output has the input's dtype.
    """
    _check_choice("method", method, _ALL_METHODS)
    _check_choice("crop", crop, CROP_METHODS)
    if width < 1 or height < 1:
        raise ResizeError(f"resize target must be at least 1x1 pixels, got width={width}, height={height}")
    if x.ndim < 4:
        raise ResizeError(f"resize expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")

    shape = tuple(x.shape)
    if x.ndim > 4:  # [B, C, *T, H, W] -> [B*T, C, H, W]
        x = x.reshape(shape[0], shape[1], -1, shape[-2], shape[-1]).movedim(2, 1)
        x = x.reshape(-1, shape[1], shape[-2], shape[-1])

    if crop == "center":
        x = _center_crop(x, width, height, method)

    if method == "bislerp":
        out = _bislerp(x, width, height)
    elif method == "lanczos":
        out = _lanczos(x, width, height)
    else:
        out = F.interpolate(x, size=(height, width), mode=method)

    if len(shape) > 4:
        out = out.reshape(shape[0], -1, shape[1], height, width).movedim(1, 2)
        out = out.reshape(shape[:-2] + (height, width))
    return out


def center_crop_box(old_width: int, old_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, kept_width, kept_height) of the symmetric crop to width:height.

    The trimmed margin is half the excess, rounded half-to-even, computed with the
    same float expressions as ComfyUI so ties fall the same way. For extreme aspect
    ratios nothing may be kept (a size of 0).
    """
    old_aspect = old_width / old_height
    new_aspect = width / height
    left = top = 0
    if old_aspect > new_aspect:  # too wide: trim left and right
        left = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:  # too tall: trim top and bottom
        top = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return left, top, old_width - 2 * left, old_height - 2 * top


def _center_crop(x: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    left, top, kept_width, kept_height = center_crop_box(x.shape[-1], x.shape[-2], width, height)
    # Pillow turns an empty image into a black one, so ComfyUI's lanczos survives an
    # empty crop; every other method fails there, here with a clearer message.
    if (kept_width < 1 or kept_height < 1) and method != "lanczos":
        raise ResizeError(
            f"center crop of a {x.shape[-1]}x{x.shape[-2]} input to the aspect ratio of "
            f"{width}x{height} leaves no pixels; use crop='disabled' or a less extreme size"
        )
    return x[..., top : top + kept_height, left : left + kept_width]


# --- bislerp ---------------------------------------------------------------------


def _bislerp(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, height, width]; slerps channel vectors along W, then H."""
    # Float sums over channels depend on memory order. ComfyUI's flattening happens to
    # leave a single image channels-first and copy a batch to channels-last; the same
    # orders here give the same last bits.
    layout = torch.contiguous_format if x.shape[0] == 1 else torch.channels_last
    v = x.float()
    v = _slerp_resample(v, dim=3, size=width, layout=layout)
    v = _slerp_resample(v, dim=2, size=height, layout=layout)
    return v.contiguous().to(x.dtype)


def _slerp_resample(v: torch.Tensor, dim: int, size: int, layout: torch.memory_format) -> torch.Tensor:
    """Resample `v` [B, C, H, W] along `dim` (2 or 3) to `size` cells."""
    lower, upper, frac = _bilinear_taps(v.shape[dim], size, v.device)
    a = v.index_select(dim, lower).contiguous(memory_format=layout)
    b = v.index_select(dim, upper).contiguous(memory_format=layout)
    frac_shape = [1, 1, 1, 1]
    frac_shape[dim] = size
    return _slerp(a, b, frac.reshape(frac_shape))


def _bilinear_taps(length: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour indices (lower, upper) and blend fraction of torch's bilinear resampling.

    The taps are read off torch's own bilinear kernel, run on index ramps, rather than
    computed in closed form: ComfyUI does it that way and the float rounding shows.
    When a source position lands within an ulp below an integer k, the lower ramp
    gives k-1 with fraction ~1 while the upper ramp rounds up to k+1, so that output
    cell takes its value from two cells away (3 -> 19 cells with torch's FMA kernels:
    output 9 reads input 2, not 1). Matching ComfyUI means keeping that.
    """
    ramp = torch.arange(length, dtype=torch.float32, device=device)
    upper_ramp = (ramp + 1).clamp(max=length - 1)  # right neighbour, edge repeated
    ramps = torch.stack((ramp, upper_ramp)).reshape(2, 1, 1, length)
    pos = F.interpolate(ramps, size=(1, size), mode="bilinear").reshape(2, size)
    frac = pos[0] - pos[0].floor()
    return pos[0].long(), pos[1].long(), frac


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Blend the channel vectors (dim 1) of a, b [B, C, H, W] by t ([1, 1, H, 1] or [1, 1, 1, W]).

    Directions are slerped, norms lerped. A zero vector has no direction and is
    blended as if orthogonal to the other one. Near-parallel pairs return `a`
    unchanged (whatever t is) and near-antiparallel ones are lerped: ComfyUI's choices.
    """
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    dir_a = torch.where(norm_a == 0.0, 0.0, a / norm_a)
    dir_b = torch.where(norm_b == 0.0, 0.0, b / norm_b)

    cos = (dir_a * dir_b).sum(1, keepdim=True)
    omega = torch.acos(cos)  # NaN where rounding pushed |cos| past 1; replaced below
    sin_omega = torch.sin(omega)
    weight_a = torch.sin((1.0 - t) * omega) / sin_omega
    weight_b = torch.sin(t * omega) / sin_omega
    out = (weight_a * dir_a + weight_b * dir_b) * (norm_a * (1.0 - t) + norm_b * t)

    out = torch.where(cos < _DEGENERATE_COS - 1, a * (1.0 - t) + b * t, out)
    return torch.where(cos > 1 - _DEGENERATE_COS, a, out)


# --- lanczos ---------------------------------------------------------------------


def _lanczos(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow LANCZOS per image, [B, C, H, W] -> [B, C, height, width].

    2, 3 or 4 channels go to Pillow together as LA, RGB, RGBA (Pillow premultiplies
    alpha, as it does for ComfyUI); other counts, which ComfyUI rejects, one at a time.
    """
    # 8-bit quantisation as ComfyUI does it: scale in the input dtype, clip, truncate.
    q = (x.detach().cpu() * 255.0).clamp(0, 255).to(torch.uint8).movedim(1, -1).numpy()
    images = []
    for image in q:  # [H, W, C] uint8
        if image.shape[-1] in (2, 3, 4):
            planes = [_pil_resize(image, width, height)]
        else:
            planes = [_pil_resize(image[..., c], width, height)[..., None] for c in range(image.shape[-1])]
        images.append(np.concatenate(planes, axis=-1))
    out = torch.from_numpy(np.stack(images)).float() / 255.0
    return out.movedim(-1, 1).to(device=x.device, dtype=x.dtype)


def _pil_resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = Image.fromarray(array).resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(resized)


# --- node semantics ----------------------------------------------------------------


def upscale_latent(
    samples: torch.Tensor, method: str, width_px: int, height_px: int, crop: str, factor: int = 8
) -> torch.Tensor:
    """LatentUpscale: resize latent `samples` [B, C, h, w] to a size given in pixels.

    A size of 0 keeps the aspect ratio from the other one; both 0 returns `samples`
    as is. Sizes are clamped to at least 64 pixels, then floor-divided by `factor`.
    """
    _check_choice("method", method, LATENT_METHODS)
    _check_choice("crop", crop, CROP_METHODS)
    if width_px == 0 and height_px == 0:
        return samples
    h, w = samples.shape[-2:]
    # The given size is clamped before it sets the other one, which is clamped after.
    width_px = max(_MIN_LATENT_PIXELS, width_px) if width_px else 0
    height_px = max(_MIN_LATENT_PIXELS, height_px) if height_px else 0
    width_px, height_px = _keep_aspect(w, h, width_px, height_px, minimum=_MIN_LATENT_PIXELS)
    return resize(samples, width_px // factor, height_px // factor, method, crop)


def upscale_latent_by(samples: torch.Tensor, method: str, scale_by: float) -> torch.Tensor:
    """LatentUpscaleBy: each spatial size times `scale_by`, rounded half-to-even."""
    _check_choice("method", method, LATENT_METHODS)
    h, w = samples.shape[-2:]
    return resize(samples, round(w * scale_by), round(h * scale_by), method)


def scale_image(image: torch.Tensor, method: str, width: int, height: int, crop: str) -> torch.Tensor:
    """ImageScale: resize `image` [B, H, W, C] to [B, height, width, C].

    A size of 0 keeps the aspect ratio from the other one (at least 1 pixel); both 0
    returns `image` as is.
    """
    _check_choice("method", method, IMAGE_METHODS)
    _check_choice("crop", crop, CROP_METHODS)
    if width == 0 and height == 0:
        return image
    h, w = image.shape[-3:-1]
    width, height = _keep_aspect(w, h, width, height, minimum=1)
    return resize(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def scale_image_by(image: torch.Tensor, method: str, scale_by: float) -> torch.Tensor:
    """ImageScaleBy: each spatial size of `image` [B, H, W, C] times `scale_by`, rounded half-to-even."""
    _check_choice("method", method, IMAGE_METHODS)
    h, w = image.shape[-3:-1]
    return resize(image.movedim(-1, 1), round(w * scale_by), round(h * scale_by), method).movedim(1, -1)


def _keep_aspect(w: int, h: int, width: int, height: int, minimum: int) -> tuple[int, int]:
    """Fill in a zero target size from the other one and the current w:h, rounded
    half-to-even and raised to at least `minimum`."""
    if width == 0:
        return max(minimum, round(w * height / h)), height
    if height == 0:
        return width, max(minimum, round(h * width / w))
    return width, height


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ResizeError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
