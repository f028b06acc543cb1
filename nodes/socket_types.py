"""Socket type names. IMAGE, MASK and LATENT carry ComfyUI's own payloads, so they keep its
names and wire into core nodes; engine objects get an `LDM_` prefix so the editor never
connects them to core nodes that expect ComfyUI's objects. Headless, the core-node
compatibility table uses ComfyUI's names for the same engine objects."""
from __future__ import annotations

from dataclasses import dataclass

IMAGE, MASK, LATENT = "IMAGE", "MASK", "LATENT"
SIGMAS = "SIGMAS"  # a 1-D float tensor of noise levels, as in ComfyUI
MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Sockets:
    model: str
    clip: str
    vae: str
    conditioning: str
    sampler: str
    noise: str
    guider: str


OURS = Sockets("LDM_MODEL", "LDM_CLIP", "LDM_VAE", "LDM_CONDITIONING", "LDM_SAMPLER", "LDM_NOISE", "LDM_GUIDER")
CORE = Sockets("MODEL", "CLIP", "VAE", "CONDITIONING", "SAMPLER", "NOISE", "GUIDER")
