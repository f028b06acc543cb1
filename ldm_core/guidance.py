"""Classifier-free guidance over a list of conditioning entries: the denoiser the samplers see.

The guider turns the model's D(x, σ, context) into the D(x, σ) of `sampling.DenoiseFn`:
every conditioning entry of both sides is evaluated in one batched forward where shapes
allow, entries of one side are combined, and the sides are mixed by the guidance scale.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .conditioning import Cond, adm_vector, common_length, repeat_to_length
from .config import ModelConfig
from .sampling import Denoiser


class CFGGuider:
    """Classifier-free guidance: x̂0 = x̂0_uncond + scale·(x̂0_cond − x̂0_uncond).

    Equivalent to guiding ε, since x̂0 is affine in ε̂ at fixed σ. Positive and negative
    entries run in one batched forward (contexts tiled to a common token count, which
    leaves attention unchanged); several entries of one side are averaged by strength.
    With scale 1 the negative side is skipped, as it cannot change the result.
    """

    def __init__(self, denoiser: Denoiser, config: ModelConfig, positive: Sequence[Cond],
                 negative: Sequence[Cond], scale: float, image_size: tuple[int, int]) -> None:
        self.denoiser, self.scale = denoiser, scale
        sides = [list(positive)] + ([] if math.isclose(scale, 1.0) else [list(negative)])
        if not sides[0]:
            raise ValueError("positive conditioning is empty")
        if len(sides) == 2 and not sides[1]:
            raise ValueError("negative conditioning is empty (use an empty prompt, not nothing)")
        height, width = image_size
        self.entries = [(side, c) for side, conds in enumerate(sides) for c in conds]
        length = common_length([c.context for _, c in self.entries])
        self.contexts = [repeat_to_length(c.context, length) for _, c in self.entries]
        self.ys = [adm_vector(config, c, width, height) for _, c in self.entries]
        self.n_sides = len(sides)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        n = len(self.entries)
        context = torch.cat([c.expand(b, -1, -1) for c in self.contexts])
        y = None if self.ys[0] is None else torch.cat([v.expand(b, -1) for v in self.ys])
        denoised = self.denoiser(x.repeat(n, 1, 1, 1), sigma.repeat(n), context, y).chunk(n)
        sums = [torch.zeros_like(x, dtype=torch.float32) for _ in range(self.n_sides)]
        weights = [0.0] * self.n_sides
        for (side, cond), d in zip(self.entries, denoised):
            sums[side] += d * cond.strength
            weights[side] += cond.strength
        pos = sums[0] / weights[0]
        if self.n_sides == 1:
            return pos
        neg = sums[1] / weights[1]
        return neg + (pos - neg) * self.scale
