"""Measured quality of a scenes model through the engine: prompt adherence, layout-to-image
box IoU and autoencoder reconstruction, scored by the procedural detector (detector.py).

Everything runs through the same code a user's graph runs: the checkpoint as loaded by
`loader.load_checkpoint`, prompts through its text encoder, layouts through its
box-layout encoder joined to the "" prompt by `conditioning.concat` (ConditioningConcat),
sampling through `pipeline.ksample`, pixels through its VAE.

Evaluation scenes come from their own seed (`EVAL_SEED`), a stream no training run
draws from, so the captions, boxes and images scored are held out.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldm_core.conditioning import cond as conditioning
from ldm_core.conditioning.cond import Cond
from ldm_core.imaging.latent import empty
from ldm_core.lab.detector import ImageScore, box_iou, detect_objects, psnr, score_image, summarize
from ldm_core.lab.scenes import Scene, SceneConfig, make_scene
from ldm_core.loading.model import Checkpoint
from ldm_core.pipeline.jobs import ksample

EVAL_SEED = 7_000_001
DEFAULTS = {"sampler": "dpmpp_2m", "scheduler": "karras", "steps": 20, "cfg": 5.0}


def eval_scenes(counts: dict[int, int], config: SceneConfig = SceneConfig(), seed: int = EVAL_SEED) -> list[Scene]:
    """The first `counts[n]` scenes with n objects of the evaluation stream, in stream order."""
    want = dict(counts)
    out: list[Scene] = []
    i = 0
    while any(v > 0 for v in want.values()):
        scene = make_scene(seed, i, config)
        n = len(scene.objects)
        if want.get(n, 0) > 0:
            out.append(scene)
            want[n] -= 1
        i += 1
    return out


@dataclass(frozen=True)
class Settings:
    sampler: str = DEFAULTS["sampler"]
    scheduler: str = DEFAULTS["scheduler"]
    steps: int = DEFAULTS["steps"]
    cfg: float = DEFAULTS["cfg"]
    seed: int = 0
    batch: int = 16  # images sampled together (one noise seed per batch, as KSampler)


def _need(ckpt: Checkpoint, layout: bool = False) -> None:
    if ckpt.text_encoder is None or ckpt.vae is None:
        raise ValueError("quality: the checkpoint needs a text encoder and a VAE")
    if layout and ckpt.layout_encoder is None:
        raise ValueError("quality: layout scores need a checkpoint with a box-layout encoder")


def generate(ckpt: Checkpoint, conds: Sequence[Cond], settings: Settings, size: int = 64) -> torch.Tensor:
    """One image per conditioning entry, against the "" prompt: IMAGE [N, H, W, 3] in 0..1.

    Entries are sampled `settings.batch` at a time: contexts stacked on the batch axis (each
    image attends only to its own), batch k seeded with `settings.seed + k`."""
    uncond = ckpt.text_encoder.encode("")
    out = []
    for k, start in enumerate(range(0, len(conds), settings.batch)):
        group = conds[start:start + settings.batch]
        length = max(c.context.shape[1] for c in group)
        if any(c.context.shape[1] != length for c in group):
            raise ValueError("quality.generate: a batch mixes context lengths; pass layout and text prompts apart")
        cond = Cond(context=torch.cat([c.context for c in group]))
        latent = empty(size, size, len(group), ckpt.model.latent_channels, ckpt.vae.factor)
        z = ksample(ckpt.model, [cond], [uncond], latent, seed=settings.seed + k, steps=settings.steps,
                    cfg=settings.cfg, sampler=settings.sampler, scheduler=settings.scheduler)
        out.append(ckpt.vae.decode(z))
    return torch.cat(out)


def layout_cond(ckpt: Checkpoint, scene: Scene, caption: str = "") -> Cond:
    """ConditioningConcat(text(caption), layout tokens of the scene's boxes), as the box-layout workflow wires it."""
    from ldm_core.lab.train.diffusion_stage import scene_layout  # the boxes exactly as training tokenized them

    objects = scene_layout(scene)
    (cond,) = conditioning.concat([ckpt.text_encoder.encode(caption)], [ckpt.layout_encoder.encode(objects)])
    return cond


def caption_scores(ckpt: Checkpoint, scenes: Sequence[Scene],
                   settings: Settings = Settings()) -> tuple[list[ImageScore], float]:
    """Text-to-image from the scenes' captions: each picture's score, in scene order, and the
    seconds per image."""
    _need(ckpt)
    start = time.perf_counter()
    images = generate(ckpt, [ckpt.text_encoder.encode(s.caption) for s in scenes], settings, scenes[0].image.shape[0])
    seconds = (time.perf_counter() - start) / len(scenes)
    return [score_image(img, s.caption) for img, s in zip(images, scenes)], seconds


def adherence(ckpt: Checkpoint, scenes: Sequence[Scene], settings: Settings = Settings()) -> dict[str, float]:
    """Objects right by object count, position words and relations honoured, seconds per image."""
    scores, seconds = caption_scores(ckpt, scenes, settings)
    return {**summarize(scores), "seconds_per_image": seconds}


def layout_scores(ckpt: Checkpoint, scenes: Sequence[Scene], settings: Settings = Settings()) -> dict[str, float]:
    """Layout-to-image from the scenes' boxes alone (prompt ""): per object, the IoU of its box with
    the detection of its colour and shape; the share of objects with IoU ≥ 0.5."""
    _need(ckpt, layout=True)
    images = generate(ckpt, [layout_cond(ckpt, s) for s in scenes], settings, scenes[0].image.shape[0])
    ious = []
    for img, s in zip(images, scenes):
        best: dict = {}
        for d in detect_objects(img):
            best.setdefault(d.label, d)
        ious += [box_iou(best[(o.colour, o.shape)].bbox, o.bbox) if (o.colour, o.shape) in best else 0.0
                 for o in s.objects]
    return {"iou_at_least_0.5": sum(i >= 0.5 for i in ious) / len(ious), "mean_iou": sum(ious) / len(ious),
            "objects": float(len(ious))}


@torch.inference_mode()
def reconstruction_psnr(ckpt: Checkpoint, scenes: Sequence[Scene]) -> float:
    """PSNR (dB) of the VAE's encode → decode of the scenes (posterior mean), as the engine runs it."""
    _need(ckpt)
    images = torch.stack([torch.from_numpy(s.image) for s in scenes]).float()
    rec = ckpt.vae.decode(ckpt.vae.encode(images))
    return psnr(images, rec.float().clamp(0, 1))
