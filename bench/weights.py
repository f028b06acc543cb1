"""The benchmark's checkpoint: random weights in the exact SD1.5 single-file layout, made once."""
from __future__ import annotations

import os
from pathlib import Path

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.networks.config import ModelConfig
from ldm_core.networks.presets import PRESETS, shrink

from .timing import progress

SEED = 0


def bench_config(quick: bool) -> ModelConfig:
    """Full-size SD1.5, or the same layout narrowed for a smoke run."""
    return shrink(PRESETS["sd1"]) if quick else PRESETS["sd1"]


def ensure_checkpoint(cache_dir: Path, quick: bool) -> Path:
    """Path of the cached fp32 checkpoint, written first if absent (atomically: no half files)."""
    name = f"sd1{'-narrow' if quick else ''}-seed{SEED}-fp32.safetensors"
    path = cache_dir / name
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    progress(f"writing {path} (random weights, once; full size takes a minute or two)")
    partial = path.with_name(f".{name}.{os.getpid()}.partial.safetensors")
    try:
        save_checkpoint(bench_config(quick), partial, SEED)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
