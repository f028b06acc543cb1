"""The one sampler table: each sampler's function and traits, under the name ComfyUI gives it.

Everything that depends on which sampler runs reads it here: KSampler's step planning
(`discard_penultimate`), the noise that re-noises an inpainting's known region
(`inpaint_noise`), which samplers can run one step at a time (`one_step`), the editor's
dropdown (the table's order) and the tests (`order`, `stochastic`). Adding a sampler is one
function in `solvers.py` and one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ldm_core.conditioning.inpaint import InpaintNoise
from ldm_core.sampling import solvers as s
from ldm_core.sampling.solvers import DenoiseFn, Sampler, StepCallback


@dataclass(frozen=True)
class SamplerEntry:
    """A sampler with its traits; callable with the `Sampler` signature (options pass through)."""

    function: Sampler
    order: int  # the highest order its steps use (on coarse or uneven grids its global order can be lower)
    stochastic: bool  # draws noise while sampling (ancestral, SDE): the result depends on the seed
    one_step: bool = False  # one model evaluation per step and no state between steps: runs a step at a time
    inpaint_noise: InpaintNoise = "start"  # the known region's noise: the start noise, or a draw from seed + 1
    discard_penultimate: bool = False  # KSampler plans one step more and drops the σ before the final 0

    def __call__(self, denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None, seed: int | None = None,
                 **options: Any) -> torch.Tensor:
        return self.function(denoiser, x, sigmas, callback=callback, seed=seed, **options)


# Order = ComfyUI's dropdown (its samplers that this engine implements, then plms).
SAMPLERS: dict[str, SamplerEntry] = {
    "euler": SamplerEntry(s.sample_euler, 1, False, one_step=True),
    "euler_ancestral": SamplerEntry(s.sample_euler_ancestral, 1, True),
    "heun": SamplerEntry(s.sample_heun, 2, False),
    "dpm_2": SamplerEntry(s.sample_dpm_2, 2, False, discard_penultimate=True),
    "dpm_2_ancestral": SamplerEntry(s.sample_dpm_2_ancestral, 2, True, discard_penultimate=True),
    "lms": SamplerEntry(s.sample_lms, 4, False),
    "dpmpp_2s_ancestral": SamplerEntry(s.sample_dpmpp_2s_ancestral, 2, True),
    "dpmpp_sde": SamplerEntry(s.sample_dpmpp_sde, 2, True),
    "dpmpp_2m": SamplerEntry(s.sample_dpmpp_2m, 2, False),
    "dpmpp_2m_sde": SamplerEntry(s.sample_dpmpp_2m_sde, 2, True),
    "dpmpp_3m_sde": SamplerEntry(s.sample_dpmpp_3m_sde, 3, True),
    "ddpm": SamplerEntry(s.sample_ddpm, 1, True),
    "lcm": SamplerEntry(s.sample_lcm, 1, True),
    "ddim": SamplerEntry(s.sample_ddim, 1, False, one_step=True, inpaint_noise="seed+1"),
    "plms": SamplerEntry(s.sample_plms, 4, False),
    "uni_pc": SamplerEntry(s.sample_uni_pc, 3, False, discard_penultimate=True),
    "uni_pc_bh2": SamplerEntry(partial(s.sample_uni_pc, variant="bh2"), 3, False, discard_penultimate=True),
}


def sampler_entry(name: str) -> SamplerEntry:
    """The table's entry for `name`; an unknown name lists the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@dataclass(frozen=True)
class SamplerChoice:
    """What a SAMPLER socket carries: a registered sampler by name, with fixed keyword options
    (eta, s_noise, …). Callable with the `Sampler` signature; hashable, so graph caching can key on it."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def entry(self) -> SamplerEntry:
        return SAMPLERS[self.name]

    def __call__(self, denoiser: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None, seed: int | None = None) -> torch.Tensor:
        return self.entry(denoiser, x, sigmas, callback=callback, seed=seed, **dict(self.options))


def select_sampler(name: str, **options: Any) -> SamplerChoice:
    """The sampler `name` of `SAMPLERS` with `options`; an unknown name lists the known ones."""
    sampler_entry(name)
    return SamplerChoice(name, tuple(sorted(options.items())))
