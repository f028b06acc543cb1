"""All node types of the pack, and the headless table of ComfyUI core nodes they stand in for.

Inside ComfyUI only our `LDM*` nodes are registered (core nodes stay ComfyUI's own). Headless,
a graph that uses ComfyUI's core SD nodes runs unchanged: each core id of CORE_NODES (gathered from
the node modules that own them) is the matching `LDM*` spec under the core's id, input names,
widget order and socket type names.
"""
from __future__ import annotations

import dataclasses
import logging

from . import (
    conditioning_nodes,
    image_nodes,
    inpaint_nodes,
    latent_nodes,
    loader_nodes,
    lora_nodes,
    mask_nodes,
    sampler_nodes,
    stepwise_nodes,
    text_nodes,
    vae_nodes,
)
from .socket_types import CORE, OURS, Sockets

log = logging.getLogger(__name__)

# Each module has specs(sockets, core) and may have CORE_NODES: the core nodes it stands in for,
# core id → (our id, core display name, core category, core input names in ComfyUI's order).
MODULES = (loader_nodes, text_nodes, conditioning_nodes, latent_nodes, sampler_nodes, vae_nodes, image_nodes,
           inpaint_nodes, mask_nodes, stepwise_nodes, lora_nodes)


def _core_table(modules) -> dict[str, tuple[str, str, str, tuple[str, ...]]]:
    table: dict[str, tuple[str, str, str, tuple[str, ...]]] = {}
    for module in modules:
        for core_id, entry in getattr(module, "CORE_NODES", {}).items():
            if core_id in table:
                raise ValueError(f"core node {core_id} is mapped by two node modules")
            table[core_id] = entry
    return table


CORE_NODES = _core_table(MODULES)


def pack_specs(sockets: Sockets = OURS, core: bool = False) -> dict:
    """Our node specs by id. A module that fails to build is logged and skipped, so one broken
    optional feature never takes the whole pack down."""
    specs = {}
    for module in MODULES:
        try:
            for spec in module.specs(sockets, core):
                specs[spec.id] = spec
        except Exception:  # noqa: BLE001 - isolate each module, report it
            log.exception("ldm-pack: node module %s failed to build its specs; its nodes are unavailable",
                          module.__name__)
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
