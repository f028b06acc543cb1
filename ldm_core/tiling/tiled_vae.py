"""Tiled VAE decode and encode whose result equals the untiled one ("exact"), or a
single-pass approximation that keeps no whole maps between layers ("fast").

Why tiles usually leave seams: every GroupNorm of the autoencoder normalises with the
mean and variance of the *whole* map; a tile run on its own normalises with its own,
so neighbouring tiles come out with different colour and contrast.

Exact mode, layer by layer. The cheap low-resolution part (decoder: post_quant_conv,
conv_in and the mid-block with its full-image attention; encoder: the mid-block,
norm_out, conv_out, quant_conv) runs whole with the model's own modules. The
full-resolution part is cut at every GroupNorm into *stages*: one stage is
[GroupNorm → SiLU] → one 3×3 conv (after a ×2 nearest upsample, or stride 2 after the
encoder's right/bottom pad) → [+ residual]. Each stage runs tile by tile over the
whole map, reading one input row and column past each cut (the conv's own zero
padding is then right at the true border and spoils only pixels outside the tile),
writing only its tile, and folding every tile into the statistics of the next
GroupNorm (`tiling.GroupStats`). The next stage therefore normalises with the exact
whole-image statistics, and since every conv sees exactly the inputs it sees
untiled, the result equals the untiled one up to fp32 rounding. Whole maps between
stages are *parked*: on the device when they fit, else in CPU memory, else "hybrid"
(in memory while the maps held there stay within one full-resolution map, the larger
ones in a temporary file, `parking.DiskMap`), else all on disk, so the device holds one
tile's working set at a time; all channels last (a disk window is then one run of bytes
per row, and oneDNN convolutions are faster on it); a block's output overwrites its residual input in place (each tile reads its
residual only where it writes).

Fast mode, one pass per tile. The GroupNorm statistics are estimated once, by an
untiled run on a mosaic of full-resolution patches taken across the image (the
decoder's first up-level is exact: its input, the mid-block output, is computed
whole), then each tile runs the full-resolution path in one go with those fixed
statistics, reading a halo as wide as the receptive field of all its convolutions.
Every tile uses the same statistics, so there are no
seams, and nothing image-sized is kept but the input and output; the error against
the untiled result is that of the estimate, measured in the tests, never zero.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_core.device import free_memory
from ldm_core.errors import LdmError
from ldm_core.networks.autoencoder_kl import AutoencoderKL, DiagonalGaussian, ResnetBlock
from ldm_core.networks.weight_cast import compute_dtype, model_compute_dtype, weight_for
from ldm_core.tiling.parking import DiskMap
from ldm_core.tiling.tile_grid import GroupStats, grid

Mode = Literal["exact", "fast"]
MODES: tuple[str, ...] = ("exact", "fast")
Resample = Literal["none", "up", "down"]

MIN_TILE = 64
MAX_TILE = 4096
# Side of the patch mosaic the fast mode estimates statistics on (decoder: latent px
# of the mid-block output; encoder: image px).
ESTIMATE_SIDE = {"decode": 32, "encode": 256}


class TilingError(LdmError, ValueError):
    """Tiled VAE arguments that cannot work (bad mode, tile size, image size)."""


@dataclass(frozen=True)
class TileOptions:
    """`tile`: side in image pixels of the tiles of the full-resolution layers (None: chosen
    from free memory); lower-resolution layers use tiles of the same element count.
    `mode`: "exact" (equals untiled) or "fast" (one pass per tile, estimated statistics).
    `park`: where whole maps wait between stages: a device, "disk" (an unlinked temporary
    file: resident memory stays at one tile's working set), "hybrid" (the device while the
    maps held there stay within one full-resolution map of the model's first width, the
    rest on disk: a resident peak near one such map, far less disk traffic than "disk"),
    or None: on a GPU the device if they fit in half its free memory, else CPU memory if
    they fit there; then hybrid if its share fits; else disk. On the CPU: hybrid, else disk."""

    tile: int | None = None
    mode: Mode = "exact"
    park: torch.device | str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TilingError(f"tiled VAE mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.park, str) and self.park not in ("disk", "hybrid"):
            try:
                torch.device(self.park)
            except RuntimeError:
                raise TilingError(f"tiled VAE park must be a device (\"cpu\", \"cuda\"), \"disk\", \"hybrid\" "
                                  f"or None (automatic), got {self.park!r}") from None
        if self.tile is not None and not MIN_TILE // 2 <= self.tile <= MAX_TILE * 4:
            raise TilingError(f"tile size {self.tile} px is out of range; "
                              f"use {MIN_TILE}..{MAX_TILE} (or None: automatic)")


# ---------------------------------------------------------------- memory and tile size

def auto_tile(model: AutoencoderKL, device: torch.device, free: int | None = None, mode: Mode = "exact") -> int:
    """A tile side (image px, multiple of 32) whose working set takes about 1/32 of free memory,
    at most 256 MiB in exact mode (its halo is one pixel, so larger tiles buy little speed and
    cost memory) and 1 GiB in fast mode (each tile recomputes a halo as wide as the receptive
    field of the whole full-resolution path, so small tiles cost time).

    A full-resolution stage holds about four maps of the widest full-resolution width per
    tile (input window, its normalised copy, conv output, residual), 4 bytes per value.
    """
    free = free_memory(device) if free is None else free
    widest = model.config.ch * max(model.config.ch_mult[:2])
    budget = min(max(free // 32, 32 << 20), (1 << 30) if mode == "fast" else (256 << 20))
    side = int(math.sqrt(budget / (4 * 4 * widest))) // 32 * 32
    return max(MIN_TILE, min(MAX_TILE, side))


def _stage_tile(tile: int, ref_channels: int, channels: int) -> int:
    """Side of a stage's tiles: the element count of a `tile`² tile at `ref_channels`."""
    return max(8, int(tile * math.sqrt(ref_channels / channels)))


Park = torch.device | Literal["disk", "hybrid"]
CHANNELS_LAST = torch.channels_last  # parked maps and tiles: a window of a disk map is then a run of bytes per row,
# and CPU convolutions (oneDNN) run faster on it


def _park_device(device: torch.device, bytes_needed: int, hybrid_bytes: int, park: torch.device | str | None) -> Park:
    """The parking asked for, or (None): on a GPU, the device if all maps fit in half its free
    memory, else CPU memory likewise; then (and on the CPU first) "hybrid" if its in-memory share
    fits, else disk. On the CPU, hybrid costs about 2% of time against all-in-RAM parking and
    halves the peak memory (bench/tiled_vae.py), so it is the default there."""
    if park is not None:
        return park if park in ("disk", "hybrid") else torch.device(park)
    if device.type != "cpu":
        for where in (device, torch.device("cpu")):
            if bytes_needed < free_memory(where) // 2:
                return where
    return "hybrid" if hybrid_bytes < free_memory(device) // 2 else "disk"


class _Held:
    """Token whose life is that of a parked map's memory."""


class _Parking:
    """Allocates the whole maps of one decode/encode where `park` says; for "hybrid", on
    `device` while the live maps held there stay within `budget` bytes, else on disk."""

    def __init__(self, park: Park, device: torch.device, budget: int = 0) -> None:
        self.park, self.device, self.budget, self.live = park, device, budget, 0

    def _in_memory(self, nbytes: int) -> torch.device | None:
        if self.park == "disk":
            return None
        if self.park != "hybrid":
            return self.park
        if self.live + nbytes > self.budget:
            return None
        self.live += nbytes
        return self.device

    def _track(self, t: Tensor) -> Tensor:
        if self.park == "hybrid":  # counted until the last tensor sharing the token (views: `share`) is gone
            t._ldm_parked = _Held()
            weakref.finalize(t._ldm_parked, self._release, t.numel() * t.element_size())
        return t

    @staticmethod
    def share(view: Tensor, base: Tensor) -> Tensor:
        """`view` of a parked `base` keeps the base's memory counted."""
        if hasattr(base, "_ldm_parked"):
            view._ldm_parked = base._ldm_parked
        return view

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def empty(self, channels: int, height: int, width: int, dtype: torch.dtype) -> Tensor | DiskMap:
        where = self._in_memory(channels * height * width * torch.finfo(dtype).bits // 8)
        if where is None:
            return DiskMap(channels, height, width)
        return self._track(torch.empty(1, channels, height, width, dtype=dtype, device=where, memory_format=CHANNELS_LAST))

    def of(self, x: Tensor) -> Tensor | DiskMap:
        """x (one sample) parked: a channels-last copy in memory, or a disk map."""
        where = self._in_memory(x.numel() * x.element_size())
        if where is None:
            return DiskMap.of(x)
        return self._track(x.to(where, memory_format=CHANNELS_LAST, copy=True))


# ---------------------------------------------------------------- one exact stage

def _window(o0: int, o1: int, n: int, resample: Resample) -> tuple[int, int, int, int]:
    """Input rows a 3×3 conv stage reads for output rows [o0, o1) of an input n long.

    Returns (read0, read1, origin, pad): read input rows [read0, read1). "none" / "up":
    the conv runs with its own zero padding of 1 on the read (×2 upsampled for "up"),
    which is right at the true border and, one row in from a cut, only spoils rows
    outside [o0, o1); `origin` is the output row of the conv's first row. "down": a
    stride-2 conv without padding over the read plus `pad` zero rows (1 at the true
    end, the original's asymmetric pad); origin is o0.
    """
    if resample == "down":
        a, b = 2 * o0, 2 * o1 + 1
        return a, min(b, n), o0, max(0, b - n)
    if resample == "up":
        ua, ub = max(o0 - 1, 0), min(o1 + 1, 2 * n)
        return ua // 2, (ub + 1) // 2, 2 * (ua // 2), 0
    ua, ub = max(o0 - 1, 0), min(o1 + 1, n)
    return ua, ub, ua, 0


def _normalised(window: Tensor, affine: tuple[Tensor, Tensor] | None, device: torch.device,
                dtype: torch.dtype) -> Tensor:
    """silu(window * scale + shift) as a new channels-last contiguous tensor on `device` (the parked
    map is never written). Windows of maps in memory and on disk take the same arithmetic, in the
    same memory format, so both parkings give the same bits."""
    w = window.to(device=device, dtype=dtype)  # a view when already there
    if affine is None:
        return w.contiguous(memory_format=CHANNELS_LAST)
    scale, shift = affine
    x = torch.empty(w.shape, dtype=dtype, device=device, memory_format=CHANNELS_LAST)
    torch.addcmul(shift, w, scale, out=x)
    return F.silu(x, inplace=True)


def _stage(src: Tensor, out: Tensor, conv: nn.Conv2d, tile: int, device: torch.device, *,
           resample: Resample = "none", norm: tuple[nn.GroupNorm, GroupStats] | None = None,
           residual: Tensor | None = None, shortcut: nn.Conv2d | None = None,
           out_stats: GroupStats | None = None) -> None:
    """out = conv([silu(norm(src))], resampled) [+ shortcut(residual)], tile by tile.

    src [B, Ci, H, W] and out [B, Co, Ho, Wo] are whole parked maps; `norm` normalises
    with the given whole-map statistics. `out` may be `residual` (or a channel slice of
    it): a tile reads its residual before writing the same pixels, and no other tile
    reads them. Each written tile is folded into `out_stats`.
    """
    weight, bias = weight_for(conv, torch.empty(0, dtype=compute_dtype(conv)))
    affine = norm[1].affine(norm[0], weight) if norm is not None else None
    height, width = src.shape[-2:]
    for y0, y1, x0, x1 in grid(out.shape[-2], out.shape[-1], tile):
        ry0, ry1, oy, pad_y = _window(y0, y1, height, resample)
        rx0, rx1, ox, pad_x = _window(x0, x1, width, resample)
        x = _normalised(src[:, :, ry0:ry1, rx0:rx1], affine, device, weight.dtype)
        if resample == "down":
            if pad_x or pad_y:
                x = F.pad(x, (0, pad_x, 0, pad_y))
            y = F.conv2d(x, weight, bias, stride=2)
        else:
            if resample == "up":
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            y = F.conv2d(x, weight, bias, padding=1)
            if y.shape[-2:] != (y1 - y0, x1 - x0):
                y = y[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox].contiguous(memory_format=CHANNELS_LAST)
        del x
        if residual is not None:
            r = residual[:, :, y0:y1, x0:x1].to(device=device, dtype=y.dtype)
            y.add_(r if shortcut is None else F.conv2d(r.contiguous(memory_format=CHANNELS_LAST),
                                                       *weight_for(shortcut, y)))
            del r
        if out_stats is not None:
            out_stats.add(y)
        out[:, :, y0:y1, x0:x1] = y


class _Runner:
    """Runs exact stages on one sample: where maps are parked, how big tiles are."""

    def __init__(self, device: torch.device, parking: _Parking, tile: int, ref_channels: int, groups: int) -> None:
        self.device, self.parking, self.tile, self.ref, self.groups = device, parking, tile, ref_channels, groups

    def empty(self, like: Tensor | DiskMap, channels: int, height: int, width: int) -> Tensor | DiskMap:
        return self.parking.empty(channels, height, width, like.dtype)

    def conv(self, src: Tensor, conv: nn.Conv2d, resample: Resample = "none",
             norm: tuple[nn.GroupNorm, GroupStats] | None = None,
             stats: bool = True) -> tuple[Tensor | DiskMap, GroupStats | None]:
        h, w = src.shape[-2:]
        # "down": pad one zero row/column, then a 3×3 stride-2 conv: floor((n + 1 - 3) / 2) + 1
        ho, wo = {"none": (h, w), "up": (2 * h, 2 * w), "down": ((h - 2) // 2 + 1, (w - 2) // 2 + 1)}[resample]
        out = self.empty(src, conv.out_channels, ho, wo)
        out_stats = GroupStats(src.shape[0], self.groups) if stats else None
        tile = _stage_tile(self.tile, self.ref, max(conv.in_channels, conv.out_channels))
        _stage(src, out, conv, tile, self.device, resample=resample, norm=norm, out_stats=out_stats)
        return out, out_stats

    def resblock(self, block: ResnetBlock, x: Tensor, stats: GroupStats) -> tuple[Tensor, GroupStats]:
        """x + conv2(silu(norm2(conv1(silu(norm1(x)))))) as two stages; the output takes x's memory."""
        h, h_stats = self.conv(x, block.conv1, norm=(block.norm1, stats))
        c_out = block.conv2.out_channels
        # A tile reads its residual before overwriting the same pixels, so a block that keeps
        # or narrows the width writes into x's own memory; a widening one needs a new map.
        if x.shape[1] == c_out:
            out = x
        elif x.shape[1] > c_out and isinstance(x, Tensor):
            out = _Parking.share(x[:, :c_out], x)
        else:
            out = self.empty(x, c_out, *x.shape[-2:])
        out_stats = GroupStats(x.shape[0], self.groups)
        tile = _stage_tile(self.tile, self.ref, max(x.shape[1], c_out))
        _stage(h, out, block.conv2, tile, self.device, norm=(block.norm2, h_stats), residual=x,
               shortcut=block.nin_shortcut, out_stats=out_stats)
        return out, out_stats


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype_of(model: nn.Module) -> torch.dtype:
    return model_compute_dtype(model)


def _full_res_map_bytes(model: AutoencoderKL, height: int, width: int, widest: bool = True) -> int:
    """Bytes of one height × width map of the widest full-resolution width (the decoder's upsampled
    input), or with `widest` False of the first width (ch · ch_mult[0])."""
    cfg = model.config
    channels = cfg.ch * (max(cfg.ch_mult[:2]) if widest else cfg.ch_mult[0])
    return channels * height * width * torch.finfo(_dtype_of(model)).bits // 8


def _parked_bytes(model: AutoencoderKL, height: int, width: int) -> int:
    """Whole maps parked at once at full resolution: at most about two of the widest width."""
    return 2 * _full_res_map_bytes(model, height, width)


def untiled_bytes(model: AutoencoderKL, height: int, width: int) -> int:
    """Rough peak activation memory of a plain decode/encode of a height × width image (≈ 3 widest maps)."""
    return 3 * _full_res_map_bytes(model, height, width)


def _parking(model: AutoencoderKL, height: int, width: int, park: torch.device | str | None) -> _Parking:
    """Where the maps of a height × width (image px) decode or encode wait; the hybrid budget is
    one full-resolution map of the model's first width."""
    device = _device_of(model)
    first = _full_res_map_bytes(model, height, width, widest=False)
    return _Parking(_park_device(device, _parked_bytes(model, height, width), first, park), device, first)


def _decode_one_exact(model: AutoencoderKL, z: Tensor, tile: int, park: torch.device | str | None) -> Tensor:
    dec, cfg = model.decoder, model.config
    device, groups, f = _device_of(model), cfg.norm_groups, cfg.downsample_factor
    parking = _parking(model, f * z.shape[-2], f * z.shape[-1], park)
    run = _Runner(device, parking, tile, cfg.ch * cfg.ch_mult[0], groups)
    h = dec.mid(dec.conv_in(model.post_quant_conv(z.to(device, _dtype_of(model)))))  # whole: cheap, global attention
    x, stats = parking.of(h), GroupStats.of(h, groups)
    del h
    for level in reversed(dec.up):
        for block in level.block:
            x, stats = run.resblock(block, x, stats)
        if level.upsample is not None:
            x, stats = run.conv(x, level.upsample.conv, "up")
    image, _ = run.conv(x, dec.conv_out, norm=(dec.norm_out, stats), stats=False)
    return image.to(device, memory_format=torch.contiguous_format)


def _encode_one_exact(model: AutoencoderKL, x: Tensor, tile: int, park: torch.device | str | None) -> Tensor:
    enc, cfg = model.encoder, model.config
    device, groups = _device_of(model), cfg.norm_groups
    parking = _parking(model, x.shape[-2], x.shape[-1], park)
    run = _Runner(device, parking, tile, cfg.ch * cfg.ch_mult[0], groups)
    # the 3-channel image stays in memory (on the device unless maps are parked elsewhere)
    x = x.to(parking.park if isinstance(parking.park, torch.device) else device, _dtype_of(model),
             memory_format=CHANNELS_LAST)
    h, stats = run.conv(x, enc.conv_in)
    for level in enc.down:
        for block in level.block:
            h, stats = run.resblock(block, h, stats)
        if level.downsample is not None:
            h, stats = run.conv(h, level.downsample.conv, "down")
    return _encoder_tail(model, h.to(device, memory_format=torch.contiguous_format))


def _encoder_tail(model: AutoencoderKL, h: Tensor) -> Tensor:
    """Mid-block, norm_out, conv_out, quant_conv on the whole low-resolution map (the model's own modules)."""
    enc = model.encoder
    h = enc.mid(h)
    h = F.silu(enc.norm_out(h), inplace=True)
    return model.quant_conv(enc.conv_out(h))


# ---------------------------------------------------------------- fast mode

Affines = dict[nn.Module, tuple[Tensor, Tensor]]


@contextmanager
def _recording(norms: list[nn.GroupNorm]) -> Iterator[dict[nn.Module, GroupStats]]:
    """Record the statistics of each norm's input while the block runs."""
    seen: dict[nn.Module, GroupStats] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen[module] = GroupStats.of(args[0], module.num_groups)

    handles = [n.register_forward_pre_hook(hook) for n in norms]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _norms(*modules: nn.Module) -> list[nn.GroupNorm]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.GroupNorm)]


def _affines(stats: dict[nn.Module, GroupStats], like: Tensor) -> Affines:
    return {norm: s.affine(norm, like) for norm, s in stats.items()}


def _mosaic(x: Tensor, side: int, multiple: int = 1, k: int = 4) -> Tensor:
    """A side × side canvas of k × k full-resolution patches taken evenly across x (x itself if small).

    Full resolution keeps each layer's local statistics (a downscaled copy loses fine detail,
    so its variances come out far too small); patches from the whole image keep the colours.
    Patch corners are multiples of `multiple` (the encoder's stride grid).
    """
    h, w = x.shape[-2:]
    if max(h, w) <= side:
        return x
    ph, pw = (max(multiple, min(n, side // k) // multiple * multiple) for n in (h, w))
    ys = [round(i * (h - ph) / (k - 1)) // multiple * multiple for i in range(k)]
    xs = [round(j * (w - pw) / (k - 1)) // multiple * multiple for j in range(k)]
    return torch.cat([torch.cat([x[..., y:y + ph, c:c + pw] for c in xs], -1) for y in ys], -2)


def _norm_silu(x: Tensor, norm: nn.Module, affines: Affines) -> Tensor:
    scale, shift = affines[norm]
    return F.silu(x * scale + shift, inplace=True)


def _resblock_fixed(block: ResnetBlock, x: Tensor, affines: Affines) -> Tensor:
    h = block.conv1(_norm_silu(x, block.norm1, affines))
    h = block.conv2(_norm_silu(h, block.norm2, affines))
    return h.add_(x if block.nin_shortcut is None else block.nin_shortcut(x))


def _up_path(model: AutoencoderKL, h: Tensor, affines: Affines | None) -> Tensor:
    """Decoder after the mid-block; with `affines`, every GroupNorm uses the given statistics."""
    dec = model.decoder
    for level in reversed(dec.up):
        for block in level.block:
            h = block(h) if affines is None else _resblock_fixed(block, h, affines)
        if level.upsample is not None:
            h = level.upsample(h)
    h = F.silu(dec.norm_out(h), inplace=True) if affines is None else _norm_silu(h, dec.norm_out, affines)
    return dec.conv_out(h)


def _down_path(model: AutoencoderKL, x: Tensor, affines: Affines | None) -> Tensor:
    """Encoder up to the mid-block input; with `affines`, every GroupNorm uses the given statistics."""
    enc = model.encoder
    h = enc.conv_in(x)
    for level in enc.down:
        for block in level.block:
            h = block(h) if affines is None else _resblock_fixed(block, h, affines)
        if level.downsample is not None:
            h = level.downsample(h)
    return h


def decoder_halo(model: AutoencoderKL) -> int:
    """Receptive-field radius, in latent px, of everything after the mid-block (+1 spare)."""
    cfg, radius, scale = model.config, 0.0, 1
    for i in reversed(range(len(cfg.ch_mult))):
        radius += 2 * (cfg.num_res_blocks + 1) / scale
        if i != 0:
            scale *= 2
            radius += 1 / scale  # the upsample conv, on the finer grid
    return math.ceil(radius + 1 / scale) + 1  # + conv_out


def encoder_halo(model: AutoencoderKL) -> int:
    """Receptive-field radius, in image px, of everything before the mid-block, rounded up to f."""
    cfg, radius, scale = model.config, 1, 1  # conv_in
    for i in range(len(cfg.ch_mult)):
        radius += 2 * cfg.num_res_blocks * scale
        if i != len(cfg.ch_mult) - 1:
            radius += 2 * scale  # stride-2 conv reaches two input px past its origin
            scale *= 2
    f = cfg.downsample_factor
    return (math.ceil(radius / f) + 1) * f


def _decode_one_fast(model: AutoencoderKL, z: Tensor, tile: int) -> Tensor:
    dec, cfg = model.decoder, model.config
    device, f = _device_of(model), cfg.downsample_factor
    h = dec.mid(dec.conv_in(model.post_quant_conv(z.to(device, _dtype_of(model)))))
    with _recording(_norms(*dec.up, dec.norm_out)) as seen:
        _up_path(model, _mosaic(h, ESTIMATE_SIDE["decode"]), None)
    first = dec.up[-1].block[0].norm1
    seen[first] = GroupStats.of(h, cfg.norm_groups)  # the mid-block output is whole: its statistics are exact
    affines = _affines(seen, h)
    halo, lt = decoder_halo(model), max(1, tile // f)
    height, width = h.shape[-2:]
    image = torch.empty(h.shape[0], cfg.out_channels, f * height, f * width, dtype=h.dtype, device=z.device)
    for y0, y1, x0, x1 in grid(height, width, lt):
        a, b, c, d = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
        part = _up_path(model, h[:, :, a:b, c:d], affines)
        image[:, :, f * y0:f * y1, f * x0:f * x1] = part[:, :, f * (y0 - a):f * (y1 - a), f * (x0 - c):f * (x1 - c)]
    return image


def _encode_one_fast(model: AutoencoderKL, x: Tensor, tile: int) -> Tensor:
    enc, cfg = model.encoder, model.config
    device, dtype, f = _device_of(model), _dtype_of(model), cfg.downsample_factor
    with _recording(_norms(*enc.down)) as seen:
        _down_path(model, _mosaic(x, ESTIMATE_SIDE["encode"], f).to(device, dtype), None)
    affines = _affines(seen, torch.empty(0, dtype=dtype, device=device))
    halo = encoder_halo(model)
    height, width = x.shape[-2:]
    width_mid = enc.mid.block_1.conv1.in_channels
    h = torch.empty(x.shape[0], width_mid, height // f, width // f, dtype=dtype, device=device)
    for y0, y1, x0, x1 in grid(height, width, max(f, tile // f * f), align=f):
        a, b, c, d = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
        part = _down_path(model, x[:, :, a:b, c:d].to(device, dtype), affines)
        h[:, :, y0 // f:y1 // f, x0 // f:x1 // f] = part[:, :, (y0 - a) // f:(y1 - a) // f, (x0 - c) // f:(x1 - c) // f]
    return _encoder_tail(model, h)


# ---------------------------------------------------------------- public entry points

def _per_sample(fn: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """GroupNorm statistics are per sample: run samples one at a time (smaller maps parked)."""
    return torch.cat([fn(batch[i:i + 1]) for i in range(batch.shape[0])])


@torch.inference_mode()
def decode_tiled(model: AutoencoderKL, z: Tensor, options: TileOptions = TileOptions()) -> Tensor:
    """D(z) in tiles: raw latent z [B, embed_dim, h, w] -> image [B, out, f h, f w] on z's device.

    Exact mode equals `model.decode(z)` up to fp32 rounding; fast mode approximates it.
    """
    if z.ndim != 4 or z.shape[1] != model.config.embed_dim:
        raise TilingError(f"latent must be [B, {model.config.embed_dim}, h, w], got {list(z.shape)}")
    tile = options.tile or auto_tile(model, _device_of(model), mode=options.mode)
    if options.mode == "fast":
        out = _per_sample(lambda s: _decode_one_fast(model, s, tile), z)
    else:
        out = _per_sample(lambda s: _decode_one_exact(model, s, tile, options.park).to(z.device), z)
    return out.to(z.device)


@torch.inference_mode()
def encode_tiled(model: AutoencoderKL, x: Tensor, options: TileOptions = TileOptions()) -> DiagonalGaussian:
    """E(x) in tiles: x [B, in, H, W] in [-1, 1], H and W multiples of f -> posterior over [B, embed_dim, H/f, W/f]."""
    f = model.config.downsample_factor
    if x.ndim != 4 or x.shape[1] != model.config.in_channels:
        raise TilingError(f"image must be [B, {model.config.in_channels}, H, W], got {list(x.shape)}")
    if x.shape[-2] % f or x.shape[-1] % f:
        raise TilingError(f"tiled encode needs H and W divisible by {f}, got {x.shape[-2]}×{x.shape[-1]}; "
                          "crop the image first (VAE.encode_tiled does)")
    tile = options.tile or auto_tile(model, _device_of(model), mode=options.mode)
    if options.mode == "fast":
        moments = _per_sample(lambda s: _encode_one_fast(model, s, tile), x)
    else:
        moments = _per_sample(lambda s: _encode_one_exact(model, s, tile, options.park), x)
    return DiagonalGaussian(moments)


__all__ = ["MODES", "TileOptions", "TilingError", "auto_tile", "decode_tiled", "decoder_halo", "encode_tiled",
           "encoder_halo", "untiled_bytes"]
