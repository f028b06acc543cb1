"""The embedded default model: a small latent diffusion model trained by this project
(`ldm-train`, see docs/embedded-model.md) on procedural scenes, shipped inside the
package so a fresh install makes real pictures with no download.

It is an ordinary single-file checkpoint (SD key layout plus its config in the
safetensors metadata), loaded through `loader.load_checkpoint` like any other; this
module only says where it lives and under which name the loaders list it.
"""
from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "ldm-scenes.safetensors"
EMBEDDED_PATH = Path(__file__).resolve().parents[1] / "data" / EMBEDDED_NAME
NATIVE_SIZE = 64  # the scenes it was trained on are 64 × 64 pixels


def embedded_checkpoint() -> Path | None:
    """The shipped checkpoint's path, or None in a checkout that does not carry it."""
    return EMBEDDED_PATH if EMBEDDED_PATH.is_file() else None


def builtin_models() -> dict[str, dict[str, Path]]:
    """Model kind → file name → path of the files that ship with the package (the loaders'
    lists show them beside the user's own models; a user file of the same name wins)."""
    path = embedded_checkpoint()
    return {"checkpoints": {EMBEDDED_NAME: path}} if path is not None else {}
