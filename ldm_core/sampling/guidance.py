"""Classifier-free guidance over regional conditioning: the denoiser the samplers see.

The guider turns the model's D(x, σ, context) into the D(x, σ) of `sampling.DenoiseFn`.
Each conditioning entry is evaluated where it applies (ComfyUI's calc_cond_batch):

- in time: skipped at any σ outside [σ(end_percent), σ(start_percent)];
- in space: on its area's crop of the latent only, with weight
  m = strength · feather (no mask) or m = strength · mask_strength · mask (mask resized to
  the latent bilinearly). The feather ramps the weight over min(8, size/4) cells along
  each area edge that lies inside the latent, (t + 1)/r for the t-th cell from the edge.

One side's prediction is Σ m_k·D_k / (Σ m_k + 1e-37) per latent cell (cells no entry covers
get 0), and the sides mix as x̂0 = x̂0_uncond + s·(x̂0_cond − x̂0_uncond). Entries whose
crops have the same shape run in one batched forward (contexts tiled to a common token
count, which leaves attention unchanged).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ldm_core.conditioning.cond import Cond, ConditioningError, adm_vector, repeat_to_length
from ldm_core.networks.config import ModelConfig
from ldm_core.sampling.schedule import DiscreteSchedule

FEATHER = 8  # cells over which an area's inner edges ramp in
MAX_TILING = 4  # batch two contexts only if tiling the shorter costs at most this factor
NEVER = 999999999.9  # σ(start_percent = 0): an entry starting at 0 is never skipped

DenoiserFn = Callable[..., torch.Tensor]  # (x, sigma, context, y=None, concat=None) -> x̂0


def percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """Sampling progress p ∈ [0, 1] → σ = exp(log σ_schedule interpolated at t = (1 − p)·(T − 1)),
    with p ≤ 0 → ∞ (never skipped) and p ≥ 1 → 0."""
    if percent <= 0.0:
        return NEVER
    if percent >= 1.0:
        return 0.0
    log_sigmas = schedule.log_sigmas  # log taken in float64 then rounded, as ComfyUI stores them
    t = torch.tensor((1.0 - percent) * (len(log_sigmas) - 1)).clamp(0, len(log_sigmas) - 1)
    w = t.frac()
    return float(((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp())


@dataclass(frozen=True)
class Region:
    """One entry resolved for a latent of a given size.

    area: (h, w, y, x) in latent cells or None (the whole latent); mask: [Bm, h_lat, w_lat]
    resized to the latent, or None; sigma_start ≥ σ ≥ sigma_end is where it applies.
    """

    side: int
    cond: Cond
    area: tuple[int, int, int, int] | None
    mask: torch.Tensor | None
    sigma_start: float
    sigma_end: float

    def applies(self, sigma: float) -> bool:
        return not (sigma > self.sigma_start or sigma < self.sigma_end)


def mask_bounds_area(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (h, w, y, x) of a mask's nonzero cells over its batch, at least 8×8;
    an all-zero mask gives (8, 8, 0, 0)."""
    nonzero = (mask.abs().amax(dim=0) != 0).nonzero()
    if len(nonzero) == 0:
        return (8, 8, 0, 0)
    (y0, x0), (y1, x1) = nonzero.amin(dim=0).tolist(), nonzero.amax(dim=0).tolist()
    return (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)


def resolve(cond: Cond, side: int, latent_hw: tuple[int, int], schedule: DiscreteSchedule | None,
            cell_scale: int = 1) -> Region:
    """Areas in fractions → cells, masks → the latent's size (bilinear), percents → σ.

    `cell_scale`: areas in cells are ComfyUI's 8-pixel cells (pixels // 8, set by the area
    nodes); a model whose VAE downsamples by f < 8 has 8 / f latent cells per such cell."""
    h, w = latent_hw
    area = None if cond.area is None else cond.area.resolve(h, w)
    if area is not None and cell_scale != 1 and not cond.area.fraction:
        area = tuple(v * cell_scale for v in area)
    mask = cond.mask
    if mask is not None:
        mask = mask.float().unsqueeze(0) if mask.ndim == 2 else mask.float()
        if tuple(mask.shape[1:]) != (h, w):
            mask = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear").squeeze(1)
        if cond.mask_bounds:
            area = mask_bounds_area(mask)
    start, end = NEVER, 0.0
    if cond.start_percent > 0.0 or cond.end_percent < 1.0:
        if schedule is None:
            raise ConditioningError("a conditioning has a timestep range, but the guider has no noise schedule "
                                    "to place it; pass schedule=")
        start, end = percent_to_sigma(schedule, cond.start_percent), percent_to_sigma(schedule, cond.end_percent)
    return Region(side, cond, area, mask, start, end)


def _inside(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Area a (h, w, y, x) lies within area b."""
    return a[2] >= b[2] and a[3] >= b[3] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def pair_areas(sides: list[list[Region]]) -> None:
    """Give every area entry a counterpart with the same area on the other side(s), in place.

    As ComfyUI does: the counterpart keeps the area entry's area, mask, strength and time
    range but takes the prompt (context, pooled, extra) of the other side's smallest entry
    enclosing that area (else its first entry without area). Without this, a region's
    guidance would compare its prompt with a negative computed on different cells.
    """
    for k, regions in enumerate(sides):
        for r in regions:  # a list may grow while another is scanned, as in ComfyUI
            if r.area is None:
                continue
            for kk, others in enumerate(sides):
                if kk == k:
                    continue
                smallest = None
                for o in others:
                    if o.area is not None:
                        if _inside(r.area, o.area) and (
                                smallest is None or smallest.area is None
                                or math.prod(smallest.area[:2]) > math.prod(o.area[:2])):
                            smallest = o
                    elif smallest is None:
                        smallest = o
                if smallest is None or smallest.area == r.area:
                    continue
                src = smallest.cond
                others.append(replace(r, side=kk, cond=replace(r.cond, context=src.context, pooled=src.pooled,
                                                                extra=src.extra)))


def area_window(area: tuple[int, int, int, int] | None, shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The area clamped to the latent: (h, w, y, x); None → the whole latent."""
    H, W = shape[-2:]
    if area is None:
        return (H, W, 0, 0)
    h, w, y, x = area
    if y >= H or x >= W:
        raise ConditioningError(f"conditioning area at y={y}, x={x} (latent cells) starts outside the "
                                f"{H}×{W} latent; move it inside the image")
    return (min(H - y, h), min(W - x, w), y, x)


def feather(size: int, offset: int, full: int) -> torch.Tensor:
    """Per-cell weight along one axis of an area: ramps (t + 1)/r over r = min(8, size // 4)
    cells at each edge that lies inside the latent (an edge on the border stays 1)."""
    ramp = torch.ones(size)
    r = min(FEATHER, size // 4)
    for t in range(r):
        if offset != 0:
            ramp[t] *= (t + 1) / r
        if offset + size < full:
            ramp[size - 1 - t] *= (t + 1) / r
    return ramp


def region_weight(region: Region, b: int, device: torch.device, window: tuple[int, int, int, int],
                  full_hw: tuple[int, int]) -> torch.Tensor:
    """The entry's weight m on `window` (h, w, y, x in the full latent of size `full_hw`), [B, 1, h, w]."""
    h, w, y0, x0 = window
    if region.mask is not None:
        mask = region.mask[:b, y0:y0 + h, x0:x0 + w].to(device, torch.float32) * region.cond.mask_strength
        if b % mask.shape[0]:
            raise ConditioningError(f"a conditioning mask has a batch of {mask.shape[0]}, which does not divide "
                                    f"the latent batch of {b}; use one mask or one per image")
        return mask.unsqueeze(1).repeat(b // mask.shape[0], 1, 1, 1) * region.cond.strength
    mult = torch.full((b, 1, h, w), float(region.cond.strength), device=device)
    if region.area is not None:
        # The feather belongs to the whole area: compute it there, keep the part inside `window`.
        ah, aw, ay, ax = area_window(region.area, full_hw)
        fy = feather(ah, ay, full_hw[0])[y0 - ay:y0 - ay + h]
        fx = feather(aw, ax, full_hw[1])[x0 - ax:x0 - ax + w]
        mult = mult * fy.to(device)[:, None] * fx.to(device)[None, :]
    return mult


def repeat_to_batch(t: torch.Tensor, b: int) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] > b:
        return t[:b]
    return t.repeat(math.ceil(b / t.shape[0]), *([1] * (t.ndim - 1)))[:b]


@dataclass
class _Job:
    region: Region
    window: tuple[int, int, int, int]
    x: torch.Tensor
    mult: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None
    concat: torch.Tensor | None

    def key(self) -> tuple:
        return (tuple(self.x.shape), None if self.y is None else tuple(self.y.shape),
                None if self.concat is None else tuple(self.concat.shape), self.context.shape[-1])

    def fits(self, first: "_Job") -> bool:
        if self.key() != first.key():
            return False
        a, b = self.context.shape[1], first.context.shape[1]
        return math.lcm(a, b) // min(a, b) <= MAX_TILING


class CFGGuider:
    """Classifier-free guidance: x̂0 = x̂0_uncond + scale·(x̂0_cond − x̂0_uncond), over regional entries.

    Equivalent to guiding ε, since x̂0 is affine in ε̂ at fixed σ. With scale 1 the negative
    side is skipped, as it cannot change the result. `schedule` places timestep ranges
    (default: the denoiser's own schedule).
    """

    def __init__(self, denoiser: DenoiserFn, config: ModelConfig, positive: Sequence[Cond],
                 negative: Sequence[Cond], scale: float, image_size: tuple[int, int], *,
                 schedule: DiscreteSchedule | None = None) -> None:
        self.denoiser, self.config, self.scale = denoiser, config, scale
        self.n_sides = 1 if math.isclose(scale, 1.0) else 2
        self.sides = [list(positive), list(negative)]
        if not self.sides[0]:
            raise ValueError("positive conditioning is empty")
        if self.n_sides == 2 and not self.sides[1]:
            raise ValueError("negative conditioning is empty (use an empty prompt, not nothing)")
        self.image_size = image_size
        self.schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
        self._regions: dict[tuple[int, int], list[Region]] = {}
        self._ys: dict[int, torch.Tensor | None] = {}

    def regions(self, latent_hw: tuple[int, int]) -> list[Region]:
        """Every entry that can run, resolved for this latent size (cached per size)."""
        if latent_hw not in self._regions:
            cell_scale = max(1, 8 // self.config.vae.downsample_factor)
            sides = [[resolve(c, k, latent_hw, self.schedule, cell_scale) for c in conds]
                     for k, conds in enumerate(self.sides)]
            pair_areas(sides)
            self._regions[latent_hw] = [r for k in range(self.n_sides) for r in sides[k]]
        return self._regions[latent_hw]

    def _y(self, cond: Cond) -> torch.Tensor | None:
        if id(cond) not in self._ys:
            height, width = self.image_size
            self._ys[id(cond)] = adm_vector(self.config, cond, width, height)
        return self._ys[id(cond)]

    def _job(self, region: Region, x: torch.Tensor, full_hw: tuple[int, int], offset: tuple[int, int]) -> _Job | None:
        """The entry's work on `x`, a crop at `offset` of a latent of size `full_hw` (the whole
        latent unless tiled): its area (full-latent cells) cut to the crop; None if they miss."""
        gh, gw, gy, gx = area_window(region.area, full_hw)
        oy, ox = offset
        y0, y1 = max(gy, oy), min(gy + gh, oy + x.shape[-2])
        x0, x1 = max(gx, ox), min(gx + gw, ox + x.shape[-1])
        if y1 <= y0 or x1 <= x0:
            return None
        window = (y1 - y0, x1 - x0, y0, x0)  # in full-latent cells
        local = (y1 - y0, x1 - x0, y0 - oy, x0 - ox)  # in the crop's cells
        h, w, ly, lx = local
        crop = x[:, :, ly:ly + h, lx:lx + w]
        concat = region.cond.extra.get("concat")
        if concat is not None:
            if tuple(concat.shape[-2:]) != tuple(full_hw):
                raise ConditioningError(f"conditioning concat input is {tuple(concat.shape[-2:])} latent cells, the "
                                        f"latent {tuple(full_hw)}; build it from an image of the latent's size")
            concat = repeat_to_batch(concat[:, :, y0:y1, x0:x1].to(x.device), x.shape[0])
        return _Job(region, local, crop, region_weight(region, x.shape[0], x.device, window, full_hw),
                    region.cond.context, self._y(region.cond), concat)

    def _run(self, jobs: list[_Job], sigma: torch.Tensor) -> list[torch.Tensor]:
        b = jobs[0].x.shape[0]
        length = math.lcm(*(j.context.shape[1] for j in jobs))
        context = torch.cat([repeat_to_length(j.context, length).expand(b, -1, -1) for j in jobs])
        y = None if jobs[0].y is None else torch.cat([j.y.expand(b, -1) for j in jobs])
        kw = {} if jobs[0].concat is None else {"concat": torch.cat([j.concat for j in jobs])}
        n = len(jobs)
        return list(self.denoiser(torch.cat([j.x for j in jobs]), sigma.repeat(n), context, y, **kw).chunk(n))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x, sigma)

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, full_hw: tuple[int, int] | None = None,
                 offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """x̂0 for `x`. Tiled sampling passes a crop: `offset` (top, left) of the crop inside a
        latent of `full_hw` cells; areas, masks and inpaint inputs stay placed on the full latent."""
        full_hw = tuple(x.shape[-2:]) if full_hw is None else tuple(full_hw)
        s0 = float(sigma.reshape(-1)[0])
        jobs = (self._job(r, x, full_hw, offset) for r in self.regions(full_hw) if r.applies(s0))
        pending = [j for j in jobs if j is not None]
        sums = [torch.zeros_like(x, dtype=torch.float32) for _ in range(self.n_sides)]
        counts = [torch.full_like(x, 1e-37, dtype=torch.float32) for _ in range(self.n_sides)]
        while pending:
            first = pending[0]
            batch = [j for j in pending if j.fits(first)]
            pending = [j for j in pending if not j.fits(first)]
            for job, d in zip(batch, self._run(batch, sigma)):
                h, w, y0, x0 = job.window
                side = job.region.side
                sums[side][:, :, y0:y0 + h, x0:x0 + w] += d.float() * job.mult
                counts[side][:, :, y0:y0 + h, x0:x0 + w] += job.mult
        pos = sums[0] / counts[0]
        if self.n_sides == 1:
            return pos
        neg = sums[1] / counts[1]
        return neg + (pos - neg) * self.scale

    def window(self, full_hw: tuple[int, int], top: int, left: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """D(x, σ) of the crop at (top, left) of a `full_hw` latent (for tiled sampling)."""
        return lambda x, sigma: self.evaluate(x, sigma, full_hw, (top, left))
