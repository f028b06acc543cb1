"""The resumable training loop shared by both stages.

A stage (`Stage` subclass) says what it trains (`modules`, `emas`, `optimizers`), how
one step's loss is computed from the step number and the run's generator, and how
to draw a picture of its progress. `run` does the rest: resume from the run folder,
step, log losses as JSON lines, save state and sample grids periodically, show a bar.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_core.lab.train.state import has_state, load_state, save_state

LOG_FILE = "log.jsonl"


class Stage:
    """One training stage. Subclasses set `name` and fill the three dicts in __init__."""

    name = "stage"

    def __init__(self, folder: str | Path, seed: int) -> None:
        self.folder = Path(folder)
        self.generator = torch.Generator().manual_seed(seed)
        self.modules: dict[str, nn.Module] = {}
        self.emas: dict[str, Any] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.step = 0

    # --- what a stage provides
    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (forward, backward, optimizer and EMA updates); returns loss parts."""
        raise NotImplementedError

    def write_samples(self, path: Path) -> None:
        """A PNG grid showing the current state (reconstructions, samples)."""

    def info(self) -> dict:
        """JSON-safe values saved with the state (config, derived constants)."""
        return {}

    def restore_info(self, doc: dict) -> None:
        """Take back what `info` saved (called on resume, before any step)."""

    # --- shared machinery
    def save(self) -> None:
        save_state(self.folder, step=self.step, modules=self.modules, emas=self.emas,
                   optimizers=self.optimizers, generator=self.generator, info={"stage": self.name, **self.info()})

    def resume(self) -> bool:
        """Continue from the folder's saved state if there is one; True if resumed."""
        if not has_state(self.folder):
            return False
        doc = load_state(self.folder, modules=self.modules, emas=self.emas, optimizers=self.optimizers,
                         generator=self.generator)
        if doc.get("stage") != self.name:
            raise ValueError(f"{self.folder} holds a {doc.get('stage')!r} run, not {self.name!r}; use another folder")
        self.step = int(doc["step"])
        self.restore_info(doc)
        return True

    def run(self, until_step: int, *, log_every: int = 10, save_every: int = 500, sample_every: int = 0,
            progress: bool = True) -> list[dict[str, float]]:
        """Train until `until_step` total steps; returns the logged records of this call."""
        self.folder.mkdir(parents=True, exist_ok=True)
        records = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=until_step, initial=self.step, desc=self.name, dynamic_ncols=True)
        start = time.perf_counter()
        with open(self.folder / LOG_FILE, "a") as log:
            while self.step < until_step:
                for m in self.modules.values():
                    m.train()
                parts = self.train_step(self.step)
                self.step += 1
                if self.step % log_every == 0 or self.step == until_step:
                    rec = {"step": self.step, **parts, "seconds": round(time.perf_counter() - start, 3)}
                    records.append(rec)
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{parts['loss']:.4f}")
                if self.step % save_every == 0 and self.step < until_step:
                    self.save()
                if sample_every and self.step % sample_every == 0:
                    self.write_samples(self.folder / f"samples_{self.step:06d}.png")
        if bar is not None:
            bar.close()
        self.save()
        return records


def seeded(make, config, seed: int):
    """`make(config)` with the global RNG seeded for the construction only: the seed alone decides its weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(config)


def cosine_lr(step: int, lr: float, lr_final: float, steps: int) -> float:
    """lr at `step`: half a cosine from `lr` (step ≤ 0) to `lr_final` (step ≥ `steps`)."""
    import math

    t = min(max(step, 0), steps) / max(steps, 1)
    return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * t))


def image_grid(rows: list[torch.Tensor]) -> "Image.Image":  # noqa: F821
    """Rows of images [N, 3, H, W] in [−1, 1] → one PIL picture, rows stacked top to bottom."""
    from PIL import Image

    width = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = torch.zeros(3, h * len(rows), w * width)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[:, i * h:(i + 1) * h, j * w:(j + 1) * w] = img.float().clamp(-1, 1)
    arr = ((canvas + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
