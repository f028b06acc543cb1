"""ComfyUI entry point of the LDM pack (custom_nodes/<any folder name>/).

Everything is reached relatively: nothing is added to sys.path and no top-level module of
ComfyUI's (`nodes`, `comfy`, `folder_paths`) is shadowed. A node module that fails to load
is logged and skipped; the rest of the pack still registers.
"""
import logging

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    from .nodes.comfy_adapter import node_mappings
    from .nodes.registry import pack_specs

    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings(pack_specs())
except Exception:  # noqa: BLE001 - never take ComfyUI down with us
    logging.getLogger(__name__).exception("ldm-pack failed to load")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
