"""All node types of the pack, and the headless table of ComfyUI core nodes they stand in for.

Inside ComfyUI only our `LDM*` nodes are registered (core nodes stay ComfyUI's own). Headless,
a graph that uses ComfyUI's core SD nodes runs unchanged: each core id below is the
matching `LDM*` spec under the core's id, input names, widget order and socket type names.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging

from .types import CORE, OURS, Sockets

log = logging.getLogger(__name__)

# Each module has specs(sockets, core) and may have CORE_NODES (merged into the table below).
MODULES = ("loaders", "text", "conditioning", "latent", "sampling", "vae", "image", "inpaint", "mask", "parts", "lora")

# core id: (our id, core display name, core category, core input names in ComfyUI's order)
CORE_NODES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "CheckpointLoaderSimple": ("LDMCheckpointLoader", "Load Checkpoint", "loaders", ("ckpt_name",)),
    "VAELoader": ("LDMVAELoader", "Load VAE", "loaders", ("vae_name",)),
    "CLIPTextEncode": ("LDMTextEncode", "CLIP Text Encode (Prompt)", "conditioning", ("text", "clip")),
    "CLIPSetLastLayer": ("LDMSetLastLayer", "CLIP Set Last Layer", "conditioning", ("clip", "stop_at_clip_layer")),
    "EmptyLatentImage": ("LDMEmptyLatentImage", "Empty Latent Image", "latent", ("width", "height", "batch_size")),
    "KSampler": ("LDMKSampler", "KSampler", "sampling", (
        "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise")),
    "KSamplerAdvanced": ("LDMKSamplerAdvanced", "KSampler (Advanced)", "sampling", (
        "model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
        "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise")),
    "VAEDecode": ("LDMVAEDecode", "VAE Decode", "latent", ("samples", "vae")),
    "VAEEncode": ("LDMVAEEncode", "VAE Encode", "latent", ("pixels", "vae")),
    "LoadImage": ("LDMLoadImage", "Load Image", "image", ("image",)),
    "SaveImage": ("LDMSaveImage", "Save Image", "image", ("images", "filename_prefix")),
    "PreviewImage": ("LDMPreviewImage", "Preview Image", "image", ("images",)),
    "LatentUpscale": ("LDMLatentUpscale", "Upscale Latent", "latent", (
        "samples", "upscale_method", "width", "height", "crop")),
    "LatentUpscaleBy": ("LDMLatentUpscaleBy", "Upscale Latent By", "latent", ("samples", "upscale_method", "scale_by")),
    "ImageScale": ("LDMImageScale", "Upscale Image", "image/upscaling", (
        "image", "upscale_method", "width", "height", "crop")),
}


def _module_core_nodes() -> None:
    """Fold each module's own CORE_NODES entries into the table (a module owns its mappings)."""
    for name in MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except Exception:  # noqa: BLE001 - reported by pack_specs
            continue
        for core_id, entry in getattr(module, "CORE_NODES", {}).items():
            if core_id in CORE_NODES and CORE_NODES[core_id] != entry:
                raise ValueError(f"core node {core_id} mapped twice")
            CORE_NODES[core_id] = entry


_module_core_nodes()


def pack_specs(sockets: Sockets = OURS, core: bool = False) -> dict:
    """Our node specs by id. A module that fails to build is logged and skipped, so one broken
    optional feature never takes the whole pack down."""
    specs = {}
    for name in MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
            for spec in module.specs(sockets, core):
                specs[spec.id] = spec
        except Exception:  # noqa: BLE001 - isolate each module, report it
            log.exception("ldm-pack: node module %s failed to load; its nodes are unavailable", name)
    return specs


def _as_core(spec, core_id: str, display: str, category: str, names: tuple[str, ...]):
    by_name = {i.name: i for i in spec.inputs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"{spec.id} lacks inputs {missing} of core node {core_id}")
    return dataclasses.replace(spec, id=core_id, display_name=display, category=category,
                               inputs=tuple(by_name[n] for n in names))


def core_specs() -> dict:
    """ComfyUI core node ids → our specs in core clothing (headless only)."""
    ours = pack_specs(CORE, core=True)
    return {core_id: _as_core(ours[our_id], core_id, display, category, names)
            for core_id, (our_id, display, category, names) in CORE_NODES.items() if our_id in ours}


def headless_registry() -> dict:
    """What `ldm-run` understands: our nodes plus the core-node compatibility table."""
    return {**pack_specs(), **core_specs()}
