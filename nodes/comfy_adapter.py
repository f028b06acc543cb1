"""ComfyUI's V1 node-class contract, generated from our specs (the only place that talks to
ComfyUI). ComfyUI's modules (`folder_paths`, `comfy.utils`) are imported lazily inside the
functions that need them, so this file imports headless too (tests build the classes)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ldm_core.graph import spec as spec_mod

from .context import FOLDERS, NodeContext

log = logging.getLogger(__name__)

# Hidden inputs ComfyUI fills in itself, by our names.
HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}


class ComfyContext(NodeContext):
    """NodeContext answered by ComfyUI's folder_paths (its models folders, input, output, temp)."""

    def __init__(self) -> None:
        import folder_paths  # ComfyUI's module: only reached inside the editor

        self._fp = folder_paths
        super().__init__({}, Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory()),
                         Path(folder_paths.get_temp_directory()), None)
        for kind, names in FOLDERS.items():
            self.model_dirs[kind] = [Path(p) for name in names for p in self._folder_list(name)]

    def _folder_list(self, name: str) -> list[str]:
        try:
            return list(self._fp.get_folder_paths(name))
        except KeyError:
            return []

    def list_models(self, kind: str) -> list[str]:
        names: set[str] = set(self.builtin_models.get(kind, {}))
        for name in FOLDERS.get(kind, (kind,)):
            try:
                names.update(self._fp.get_filename_list(name))
            except KeyError:
                continue
        return sorted(names)


def _previews_enabled() -> tuple[bool, int]:
    """ComfyUI's own switch (`--preview-method`; "none" by default) and its `--preview-size`."""
    try:
        from comfy.cli_args import args
    except Exception:  # noqa: BLE001 - an older or stripped ComfyUI: no previews, never an error
        return False, 512
    method = getattr(getattr(args, "preview_method", None), "value", "none")
    return method != "none", int(getattr(args, "preview_size", 512))


class ComfyProgress:
    """Our Progress protocol onto ComfyUI's progress bar: step counts always, and a latent
    preview per step when ComfyUI's preview method is on. `preview` is a zero-argument
    callable returning an RGB uint8 array [h, w, 3] (see ldm_core.preview); it is only
    called when the preview will be shown, so previews cost nothing when they are off."""

    def __init__(self, unique_id: str | None = None) -> None:
        self.bar = None
        self.unique_id = unique_id
        self.previews, self.preview_size = False, 512

    def start(self, total: int) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total, node_id=self.unique_id)
        self.previews, self.preview_size = _previews_enabled()

    def update(self, done: int, total: int, preview: Any = None) -> None:
        if self.bar is None:
            return
        image = None
        if self.previews and callable(preview):
            try:
                rgb = preview()
                if rgb is not None:
                    from PIL import Image

                    image = ("JPEG", Image.fromarray(rgb), self.preview_size)
            except Exception:  # noqa: BLE001 - a failed preview must never fail the sampling
                log.exception("ldm-pack: latent preview failed; continuing without previews")
                self.previews = False
        self.bar.update_absolute(done, total, image)

    def finish(self) -> None:
        self.bar = None


def _widget_options(i: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("default", "min", "max", "step", "round"):
        value = getattr(i, key)
        if value is not None:
            opts[key] = value
    if i.multiline:
        opts["multiline"] = True
    if i.control_after_generate:
        opts["control_after_generate"] = True
    if i.force_input:
        opts["forceInput"] = True
    if i.image_upload:
        opts["image_upload"] = True
    if i.tooltip:
        opts["tooltip"] = i.tooltip
    return opts


def input_types(spec: Any, context: Any = None) -> dict[str, dict[str, tuple]]:
    """A spec's inputs in ComfyUI's INPUT_TYPES form."""
    out: dict[str, dict[str, tuple]] = {"required": {}, "optional": {}}
    for i in spec.inputs:
        kind = "optional" if i.optional else "required"
        if i.type == spec_mod.COMBO:
            first = i.choice_list(context)
            out[kind][i.name] = (first, _widget_options(i))
        else:
            out[kind][i.name] = (i.type, _widget_options(i))
    hidden = {name: HIDDEN[name] for name in spec.hidden if name in HIDDEN}
    if "progress" in spec.hidden:
        hidden.setdefault("unique_id", "UNIQUE_ID")
    if hidden:
        out["hidden"] = hidden
    if not out["optional"]:
        del out["optional"]
    return out


def make_class(spec: Any, context_factory: Any = ComfyContext) -> type:
    """A ComfyUI V1 node class whose every attribute is read off `spec`."""

    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        try:
            ctx = context_factory()
        except Exception:  # noqa: BLE001 - folder listing must never break the node list
            ctx = None
        return input_types(spec, ctx)

    def execute(self, **kwargs):
        ctx = context_factory()
        if "progress" in spec.hidden:
            kwargs["progress"] = ComfyProgress(kwargs.pop("unique_id", None))
            if "unique_id" not in spec.hidden:
                kwargs.pop("unique_id", None)
        result = spec.run(ctx, **kwargs)
        return result

    attrs: dict[str, Any] = {
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(o.type for o in spec.outputs),
        "RETURN_NAMES": tuple(o.label for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in spec.outputs),
        "FUNCTION": "execute",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "execute": execute,
        "SPEC": spec,
    }
    if spec.is_changed is not None:
        def IS_CHANGED(cls, **kwargs):  # noqa: N802
            literals = {k: v for k, v in kwargs.items() if spec.input(k) is not None and spec.input(k).is_widget}
            return spec.is_changed(context_factory(), **literals)

        attrs["IS_CHANGED"] = classmethod(IS_CHANGED)
    return type(spec.id, (), attrs)


def node_mappings(specs: dict, context_factory: Any = ComfyContext) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS; a spec that fails is skipped and logged."""
    classes, names = {}, {}
    for node_id, spec in specs.items():
        try:
            classes[node_id] = make_class(spec, context_factory)
            names[node_id] = spec.display_name
        except Exception:  # noqa: BLE001
            log.exception("ldm-pack: node %s could not be registered", node_id)
    return classes, names
