"""Tiled diffusion (MultiDiffusion, Bar-Tal et al. 2023) for latents larger than the model was
trained on or than memory allows.

Every sampler step calls the denoiser on overlapping windows of the latent and merges the
window predictions x̂0 by a per-pixel weighted average — the least-squares fusion of the
MultiDiffusion paper (uniform weights), or with weights that ramp down linearly across each
overlap ("feather") so no window edge is ever a hard seam. Because samplers only ever see
D(x, σ), the tiled denoiser is itself a D(x, σ): every sampler of `SAMPLERS` works on it
unchanged. Each window may carry its own prompt (regional prompts per window).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """A latent-space rectangle; `key` selects a per-window conditioning (None: the shared one)."""

    top: int
    left: int
    height: int
    width: int
    key: object = None

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.top:self.top + self.height, self.left:self.left + self.width]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride tile − overlap, the last window flush with the end."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def plan_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Windows of `tile`×`tile` latent pixels (clipped to the latent) covering it with at least
    `overlap` pixels shared between neighbours."""
    if tile < 1:
        raise ValueError(f"tile must be at least 1 latent pixel, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap {overlap} with tile {tile}")
    th, tw = min(tile, height), min(tile, width)
    return [Window(y, x, th, tw) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def window_weight(window: Window, height: int, width: int, overlap: int, mode: str) -> torch.Tensor:
    """[h, w] blending weight of one window. "uniform": 1 everywhere (MultiDiffusion). "feather":
    a linear ramp from 1/(overlap+1) up to 1 across `overlap` pixels at each edge that lies
    inside the latent (edges on the latent's border keep full weight)."""
    w = torch.ones(window.height, window.width)
    if mode == "uniform" or overlap == 0:
        return w
    if mode != "feather":
        raise ValueError(f"unknown blend mode {mode!r}; use 'uniform' or 'feather'")
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)

    def edge(n: int, inner_start: bool, inner_end: bool) -> torch.Tensor:
        v = torch.ones(n)
        k = min(overlap, n)
        if inner_start:
            v[:k] = torch.minimum(v[:k], ramp[:k])
        if inner_end:
            v[n - k:] = torch.minimum(v[n - k:], ramp[:k].flip(0))
        return v

    rows = edge(window.height, window.top > 0, window.top + window.height < height)
    cols = edge(window.width, window.left > 0, window.left + window.width < width)
    return w * rows[:, None] * cols[None, :]


class TiledDenoiser:
    """D(x, σ) = Σ_w W_w · D_w(crop_w(x), σ) / Σ_w W_w over the windows.

    `denoiser_for(window)` gives the denoiser of a window (e.g. a guider's view of that crop,
    with the window's own conditioning); it is called once per window and cached here, so
    it is built once per sampling run, not per step.
    """

    def __init__(self, denoiser_for: Callable[[Window], DenoiseFn], windows: Sequence[Window],
                 height: int, width: int, overlap: int, mode: str = "feather") -> None:
        if not windows:
            raise ValueError("tiled sampling needs at least one window")
        self.windows = list(windows)
        self.height, self.width = height, width
        covered = torch.zeros(height, width)
        self.weights = []
        for win in self.windows:
            if win.top < 0 or win.left < 0 or win.top + win.height > height or win.left + win.width > width:
                raise ValueError(f"window {win} lies outside the {height}×{width} latent")
            weight = window_weight(win, height, width, overlap, mode)
            self.weights.append(weight)
            win.crop(covered).add_(weight)
        if (covered <= 0).any():
            raise ValueError("the windows leave part of the latent uncovered")
        self.total = covered
        self._denoiser_for = denoiser_for
        self._cache: dict[Window, DenoiseFn] = {}

    def _denoiser(self, win: Window) -> DenoiseFn:
        if win not in self._cache:
            self._cache[win] = self._denoiser_for(win)
        return self._cache[win]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"latent is {tuple(x.shape[-2:])}, the windows were planned for {(self.height, self.width)}")
        if self.total.device != x.device:  # move the blend weights once, not every step
            self.weights = [w.to(x.device) for w in self.weights]
            self.total = self.total.to(x.device)
        acc = torch.zeros_like(x, dtype=torch.float32)
        for win, weight in zip(self.windows, self.weights):
            d = self._denoiser(win)(win.crop(x).contiguous(), sigma).float()
            win.crop(acc).add_(d * weight)
        return (acc / self.total).to(x.dtype)
