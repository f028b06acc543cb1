"""Cold checkpoint loading: ours (lazy, and with every weight touched) vs diffusers vs a raw read."""
from __future__ import annotations

import gc
import itertools
from pathlib import Path

import torch
from diffusers.utils import is_accelerate_available
from safetensors.torch import load_file

from ldm_core.loading.loader import load_checkpoint
from ldm_core.loading.model import Checkpoint

from . import system
from .cases import text_encoders
from .table import Row
from .timing import interleaved

TARGET_VS_RAW = 1.2


@torch.inference_mode()
def touch(ckpt: Checkpoint) -> float:
    """Sum every parameter and buffer once, so each page of a lazily mapped file is read."""
    modules = [ckpt.model.unet, *text_encoders(ckpt)]
    modules += [ckpt.vae.model] if ckpt.vae is not None else []
    total = 0.0
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            total += float(t.sum()) if t.is_floating_point() else 0.0
    return total


def diffusers_pipeline(path: Path, pipeline_dir: Path) -> object:
    """diffusers' single-file load, offline: configs from the local folder, nothing fetched."""
    from diffusers import StableDiffusionPipeline  # heavy import: only when this case runs

    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(pipeline_dir), local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )


def lazy_read_share(path: Path, whole_cache: bool) -> str:
    """How much of the file a cold `load_checkpoint` alone pulled into memory (untimed probe)."""
    gc.collect()
    if system.evict(path, whole_cache=whole_cache).startswith("warm"):
        return ""
    ckpt = load_checkpoint(path, device="cpu")
    share = system.resident_fraction(path)
    del ckpt
    return "" if share is None else f"; the lazy load alone read {share:.0%} of the file"


def run(path: Path, pipeline_dir: Path, repeats: int, *, whole_cache: bool = True) -> list[Row]:
    """Each load starts from an evicted page cache where the system allows it (see `system.evict`).

    `whole_cache` False evicts only the checkpoint's pages (for smoke runs on shared machines).
    """
    how: set[str] = set()

    def before() -> None:
        gc.collect()  # the previous load's modules and mappings must be gone before eviction
        how.add(system.evict(path, whole_cache=whole_cache))

    medians = interleaved({
        "ours": lambda: load_checkpoint(path, device="cpu"),
        "ours + touch": lambda: touch(load_checkpoint(path, device="cpu")),
        "diffusers": lambda: diffusers_pipeline(path, pipeline_dir),
        "raw read": lambda: load_file(str(path)),
    }, repeats, before=before, label="load")
    warm = sorted(h for h in how if h.startswith("warm page cache"))
    cache = warm[0] if warm else "cold (" + "; ".join(sorted(how)) + ")"
    raw = f"{cache}; raw = safetensors.torch.load_file"
    lazy = lazy_read_share(path, whole_cache)
    init = "" if is_accelerate_available() else "; diffusers without accelerate: random init, then copy"
    return [
        Row("checkpoint load: ours `load_checkpoint` (lazy mmap) vs raw read",
            medians["ours"], medians["raw read"], TARGET_VS_RAW, raw + lazy),
        Row("checkpoint load: ours + touch every weight vs raw read",
            medians["ours + touch"], medians["raw read"], TARGET_VS_RAW, raw),
        Row("checkpoint load: ours + touch vs diffusers `StableDiffusionPipeline.from_single_file`",
            medians["ours + touch"], medians["diffusers"], None, cache + init),
    ]
