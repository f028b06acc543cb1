"""Batches of procedural scenes: item i of batch k is scene k·B + i of the seed's stream,
so a batch depends only on (seed, step) and a resumed run sees the same data."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ldm_core.lab.scenes import Scene, SceneConfig, make_scene

# Held-out scenes (evaluation, PSNR) come from a stream no training run uses.
HELDOUT_OFFSET = 1_000_003


@dataclass
class SceneBatch:
    """images [B, 3, H, W] in [−1, 1]; the scenes themselves for captions and layouts."""

    images: torch.Tensor
    scenes: list[Scene]

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes]


def scene_batch(seed: int, step: int, batch_size: int, config: SceneConfig) -> SceneBatch:
    scenes = [make_scene(seed, step * batch_size + i, config) for i in range(batch_size)]
    return SceneBatch(images_to_tensor([s.image for s in scenes]), scenes)


def heldout_batch(seed: int, count: int, config: SceneConfig) -> SceneBatch:
    return scene_batch(seed + HELDOUT_OFFSET, 0, count, config)


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """[H, W, 3] arrays in 0..1 → [B, 3, H, W] float32 in [−1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() * 2 - 1


def scene_config_to_dict(config: SceneConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def scene_config_from_dict(d: dict) -> SceneConfig:
    names = {f.name for f in dataclasses.fields(SceneConfig)}
    if unknown := sorted(set(d) - names):
        raise ValueError(f"SceneConfig: unknown keys {unknown}; known keys are {sorted(names)}")
    return SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
