"""Cheap per-step previews: the sampler's x̂0 (model-space latent) → a small RGB picture.

Decoding every step with the VAE would cost as much as the step itself, so a preview is an
affine map per latent pixel, RGB = A·z + b, shown at latent resolution. The map is not a
table of constants for known model families: it is fitted, by least squares, to the very
VAE that will decode the final image — encode a few smooth procedural colour fields, pair
each latent pixel with the mean colour of the f×f pixel block it covers, solve. So it is
right for any checkpoint, including ones this project trains, and costs one small encode
(once per VAE, only when previews are shown).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class Encoder(Protocol):
    """What fitting needs from a VAE (ldm_core.model.VAE has it)."""

    @property
    def factor(self) -> int: ...

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...  # IMAGE [B,H,W,3] 0..1 → raw latent


def colour_fields(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """`n` smooth random colour images [n, size, size, 3] in 0..1: random colours on a coarse
    grid (2×2 up to 5×5), bilinearly upsampled, plus flat colours — enough colour variety to
    pin down a 3×C affine map, with little high frequency the map cannot express anyway."""
    g = torch.Generator("cpu").manual_seed(seed)
    images = []
    for k in range(n):
        cells = 1 + k % 5
        coarse = torch.rand(1, 3, cells, cells, generator=g)
        images.append(F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[0])
    return torch.stack(images).movedim(1, -1).clamp(0, 1)


@dataclass(frozen=True)
class LatentPreviewer:
    """RGB = weight·z + bias per latent pixel; `weight` [3, C], `bias` [3], both float32 CPU."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, vae: Encoder, latent_scale: float = 1.0, n_images: int = 12, size: int = 64,
            seed: int = 0) -> "LatentPreviewer":
        """Least-squares fit against `vae`'s own encoder; `latent_scale` maps raw → model space
        (the space the sampler's x̂0 lives in)."""
        images = colour_fields(n_images, size, seed)
        z = vae.encode(images).float() * latent_scale  # [n, C, h, w]
        target = F.avg_pool2d(images.movedim(-1, 1), vae.factor)  # [n, 3, h, w]
        if target.shape[-2:] != z.shape[-2:]:
            raise ValueError(f"VAE factor {vae.factor} does not match the latent size {tuple(z.shape[-2:])}")
        X = torch.cat([z.movedim(1, -1).reshape(-1, z.shape[1]), torch.ones(z.numel() // z.shape[1], 1)], dim=1)
        Y = target.movedim(1, -1).reshape(-1, 3)
        # Normal equations in float64 with a whisper of ridge: well-posed even for a degenerate encoder.
        X64, Y64 = X.double(), Y.double()
        gram = X64.T @ X64
        gram += torch.eye(gram.shape[0], dtype=torch.float64) * 1e-8 * gram.diagonal().mean()
        solution = torch.linalg.solve(gram, X64.T @ Y64)  # [C+1, 3]
        return cls(solution[:-1].T.float().contiguous(), solution[-1].float().contiguous())

    @classmethod
    def channels(cls, channels: int) -> "LatentPreviewer":
        """A model-agnostic stand-in when no VAE is known: the first three channels (fewer
        repeated) around mid-grey, so structure is visible even if the colours are not."""
        weight = torch.zeros(3, channels)
        for c in range(3):
            weight[c, c % channels] = 0.25
        return cls(weight, torch.full((3,), 0.5))

    def rgb(self, x0: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] → [B, h, w, 3] float in 0..1."""
        z = x0.detach().float().cpu().movedim(1, -1)
        return (z @ self.weight.T + self.bias).clamp(0, 1)

    def __call__(self, x0: torch.Tensor) -> np.ndarray:
        """The first image of the batch as uint8 [h, w, 3]."""
        return (self.rgb(x0[:1])[0] * 255).round().to(torch.uint8).numpy()


class VAEPreview:
    """A previewer bound to a VAE, fitted on first use (previews that are never shown cost nothing)."""

    def __init__(self, vae: Encoder, latent_scale: float) -> None:
        self.vae, self.latent_scale = vae, latent_scale
        self._fitted: LatentPreviewer | None = None

    def __call__(self, x0: torch.Tensor) -> np.ndarray:
        if self._fitted is None:
            self._fitted = LatentPreviewer.fit(self.vae, self.latent_scale)
        return self._fitted(x0)
