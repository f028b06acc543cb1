"""ComfyUI entry point of the LDM pack (custom_nodes/<any folder name>/).

The engine and the nodes have one name each wherever they run: `ldm_core` and `ldm_nodes`
(`pip install`, tests, and here). ComfyUI imports this folder as a package named after the
folder and puts nothing on sys.path, so the two packages are mounted here under those names
from this folder's `ldm_core/` and `nodes/` (no sys.path entry is added, and no top-level
module of ComfyUI's — `nodes`, `comfy`, `folder_paths` — is shadowed). Everything else then
imports them with ordinary import statements. A node module that fails is logged and
skipped; the rest of the pack still registers.
"""
import importlib.util
import logging
import sys
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_HERE = Path(__file__).resolve().parent


def _mount(name: str, folder: Path) -> None:
    """Import the package in `folder` as the top-level `name`, unless this very package already is."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        where = Path(getattr(loaded, "__path__", [""])[0] or ".").resolve()
        if where != folder:
            raise ImportError(f"another copy of {name} is already imported from {where}; this pack's own is "
                              f"{folder}. Remove the other install (pip uninstall ldm-pack) or the duplicate pack folder.")
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


try:
    _mount("ldm_core", _HERE / "ldm_core")
    _mount("ldm_nodes", _HERE / "nodes")
    from ldm_nodes.comfy_adapter import node_mappings
    from ldm_nodes.registry import pack_specs

    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings(pack_specs())
except Exception:  # noqa: BLE001 - never take ComfyUI down with us
    logging.getLogger(__name__).exception("ldm-pack failed to load")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
