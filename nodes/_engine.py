"""Where the engine comes from.

Inside ComfyUI this pack is imported as a package named after its folder
(`custom_nodes/<any name>/`), and the engine is the sibling package `<that name>.ldm_core`:
reached relatively, so nothing is added to sys.path and no top-level name of ComfyUI's
(`nodes`, `comfy`, `folder_paths`) is shadowed. Headless (`pip install`, tests) the
engine is the top-level `ldm_core`. Either way one process holds one copy of it.
"""
from __future__ import annotations

import importlib

_parent = __package__.rpartition(".")[0] if __package__ else ""
try:
    ldm_core = importlib.import_module(f"{_parent}.ldm_core") if _parent else None
except ImportError:
    ldm_core = None
if ldm_core is None:
    ldm_core = importlib.import_module("ldm_core")


def engine(module: str):
    """`engine("loader")` → the `ldm_core.loader` module of the engine in use."""
    return importlib.import_module(f"{ldm_core.__name__}.{module}")
