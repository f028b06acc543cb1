"""Tile geometry and whole-image GroupNorm statistics gathered tile by tile.

Tiles: `spans(size, tile)` cuts [0, size) into near-equal pieces of at most `tile`
(optionally with every inner edge on a multiple of `align`); `grid` crosses row and
column spans. A tile is the region a stage *writes*; what it must *read* (its halo)
is the stage's business (see `tiled_vae.py`).

Statistics: GroupNorm normalises each (sample, group) by the mean μ and the biased
variance σ² over all of that group's channels and pixels. A tile sees only part of
the pixels, so `GroupStats` merges per-tile (n, μ, M2 = n σ²) with the pairwise update
of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n

Per-tile moments are taken in fp32 (torch.var_mean, itself stable), the merge in fp64,
so the result does not depend on how the image was cut, up to fp32 rounding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

Tile = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def spans(size: int, tile: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, size) as ceil(size / tile) contiguous spans, each at most `tile` long (up to `align`).

    Inner edges are rounded to multiples of `align`; the last span ends at `size`.
    """
    if size <= 0:
        raise ValueError(f"cannot tile an empty axis (size {size})")
    if tile < 1 or align < 1:
        raise ValueError(f"tile and align must be positive, got tile={tile}, align={align}")
    n = max(1, math.ceil(size / max(tile, align)))
    edges = sorted({0, size, *(round(i * size / n / align) * align for i in range(1, n))})
    edges = [e for e in edges if 0 <= e <= size]
    return list(zip(edges, edges[1:]))


def grid(height: int, width: int, tile: int, align: int = 1) -> list[Tile]:
    """Row-major tiles covering a height × width map exactly once."""
    return [(y0, y1, x0, x1) for y0, y1 in spans(height, tile, align) for x0, x1 in spans(width, tile, align)]


class GroupStats:
    """Running per-(sample, group) count, mean and M2 of a [B, C, H, W] map seen in tiles.

    `add(tile)` folds in one tile; `affine(norm)` turns the totals into the per-channel
    scale and shift that make `x * scale + shift` equal `norm(x)` over the whole map:
    scale = γ / sqrt(σ² + ε), shift = β − μ · scale.
    """

    def __init__(self, batch: int, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean = torch.zeros(batch, groups, dtype=torch.float64)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64)

    @classmethod
    def of(cls, x: Tensor, groups: int) -> GroupStats:
        stats = cls(x.shape[0], groups)
        stats.add(x)
        return stats

    def add(self, x: Tensor) -> None:
        """Fold in a tile x [B, C, h, w] (C divisible by the group count)."""
        b, c = x.shape[:2]
        if c % self.groups:
            raise ValueError(f"{c} channels do not split into {self.groups} groups")
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # channels last: group g's values are [:, :, g, :] of [B, H·W, G, C/G], no copy
            xg, dims = x.permute(0, 2, 3, 1).reshape(b, -1, self.groups, c // self.groups), (1, 3)
        else:
            xg, dims = x.reshape(b, self.groups, -1), (-1,)
        n = math.prod(x.shape[2:]) * (c // self.groups)
        var, mean = torch.var_mean(xg.float(), dim=dims, correction=0)
        mean, m2 = mean.double().cpu(), var.double().cpu() * n
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> Tensor:
        """Biased variance [B, G] (what GroupNorm divides by)."""
        return self.m2 / max(self.count, 1)

    def affine(self, norm: nn.GroupNorm, like: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, shift), each [B, C, 1, 1] in `like`'s dtype and device, for `norm` over the whole map."""
        if norm.num_groups != self.groups:
            raise ValueError(f"statistics have {self.groups} groups, the norm {norm.num_groups}")
        per_group = norm.num_channels // self.groups
        rstd = (self.var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)  # [B, C]
        mean = self.mean.repeat_interleave(per_group, dim=1)
        ones = torch.ones(norm.num_channels, dtype=torch.float64)
        weight = norm.weight.detach().double().cpu() if norm.affine else ones
        bias = norm.bias.detach().double().cpu() if norm.affine else ones * 0
        scale = weight * rstd
        shift = bias - mean * scale
        to = {"dtype": like.dtype, "device": like.device}
        return scale[..., None, None].to(**to), shift[..., None, None].to(**to)


__all__ = ["GroupStats", "Tile", "grid", "spans"]
