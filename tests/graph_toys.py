"""Toy node types with the shape of a text-to-image graph, for tests and benchmarks of the
graph runtime: pure Python (strings stand in for models and tensors), each call counted
in a Counter the caller passes in, so tests can assert what ran. Also builders of editor
(UI) workflows and of PNGs that carry one, and one txt2img graph in both formats.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ldm_core.graph.spec import BOOLEAN, COMBO, FLOAT, INT, STRING, InputSpec, NodeSpec, OutputSpec

SAMPLERS = ("euler", "heun", "dpmpp_2m")


def toy_registry(calls: Counter | None = None, checkpoints: tuple[str, ...] = ("sd15.safetensors", "tiny.ckpt")) -> dict[str, NodeSpec]:
    """A registry of toy nodes: Loader, Encode, EmptyLatent, Sampler, Decode, Save, Preview,
    Const, Add, Fail. `calls[class_type]` counts runs."""
    calls = Counter() if calls is None else calls

    def counted(class_type: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(context: Any, **inputs: Any) -> Any:
            calls[class_type] += 1
            return fn(**inputs)

        return run

    def node(class_type: str, fn: Callable[..., Any], inputs: tuple[InputSpec, ...] = (),
             outputs: tuple[OutputSpec, ...] = (), **kw: Any) -> NodeSpec:
        return NodeSpec(class_type, class_type, "toy", counted(class_type, fn), inputs, outputs, **kw)

    def sample(model, positive, negative, latent, seed, steps, cfg, sampler_name, denoise=1.0, add_noise=True):
        return (f"sampled({model},{positive},{negative},{latent},{seed},{steps},{cfg},{sampler_name},{denoise})",)

    specs = [
        node("Loader", lambda ckpt_name: (f"model[{ckpt_name}]", f"clip[{ckpt_name}]", f"vae[{ckpt_name}]"),
             (InputSpec("ckpt_name", COMBO, choices=lambda ctx: checkpoints),),
             (OutputSpec("TOY_MODEL", "model"), OutputSpec("TOY_CLIP", "clip"), OutputSpec("TOY_VAE", "vae"))),
        node("Encode", lambda clip, text: (f"cond({clip},{text})",),
             (InputSpec("clip", "TOY_CLIP"), InputSpec("text", STRING, default="", multiline=True)),
             (OutputSpec("TOY_COND", "conditioning"),)),
        node("EmptyLatent", lambda width, height, batch_size: (f"latent({width}x{height}x{batch_size})",),
             (InputSpec("width", INT, 512, 16, 4096, 8), InputSpec("height", INT, 512, 16, 4096, 8),
              InputSpec("batch_size", INT, 1, 1, 64)),
             (OutputSpec("LATENT"),)),
        node("Sampler", sample,
             (InputSpec("model", "TOY_MODEL"), InputSpec("positive", "TOY_COND"), InputSpec("negative", "TOY_COND"),
              InputSpec("latent", "LATENT"), InputSpec("seed", INT, 0, 0, 2**64 - 1, control_after_generate=True),
              InputSpec("steps", INT, 20, 1, 1000), InputSpec("cfg", FLOAT, 7.0, 0.0, 100.0),
              InputSpec("sampler_name", COMBO, choices=SAMPLERS),
              InputSpec("denoise", FLOAT, 1.0, 0.0, 1.0, optional=True),
              InputSpec("add_noise", BOOLEAN, True, optional=True)),
             (OutputSpec("LATENT"),)),
        node("Decode", lambda samples, vae: (f"image({samples},{vae})",),
             (InputSpec("samples", "LATENT"), InputSpec("vae", "TOY_VAE")), (OutputSpec("IMAGE"),)),
        node("Save", lambda images, filename_prefix: {"ui": {"images": [f"{filename_prefix}:{images}"]}},
             (InputSpec("images", "IMAGE"), InputSpec("filename_prefix", STRING, "out")), output_node=True),
        node("Preview", lambda images: {"ui": {"images": [images]}, "result": ()},
             (InputSpec("images", "IMAGE"),), output_node=True),
        node("Const", lambda value: (value,), (InputSpec("value", INT, 0, -(2**31), 2**31),), (OutputSpec(INT, "value"),)),
        node("Add", lambda a, b=0: (a + b,), (InputSpec("a", INT, force_input=True), InputSpec("b", INT, 0, optional=True)),
             (OutputSpec(INT, "sum"),)),
        node("Show", lambda value: {"ui": {"value": value}, "result": (value,)},
             (InputSpec("value", INT, force_input=True),), (OutputSpec(INT),), output_node=True),
        node("Fail", _fail, (InputSpec("value", INT, force_input=True),), (OutputSpec(INT),)),
    ]
    return {s.id: s for s in specs}


def _fail(value: int) -> tuple[int]:
    raise ValueError(f"toy failure on {value}")


# --- editor-format builders -------------------------------------------------------------------

def ui_node(node_id: int, type_: str, inputs: Sequence[tuple] = (), outputs: Sequence[tuple] = (),
            widgets: Any = (), mode: int = 0, **extra: Any) -> dict:
    """One editor node. inputs: (name, type, link_id or None[, widget_name]); outputs: (name, type)."""
    node: dict[str, Any] = {
        "id": node_id, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0, "mode": mode,
        "inputs": [], "outputs": [], "properties": {"Node name for S&R": type_},
    }
    for inp in inputs:
        slot = {"name": inp[0], "type": inp[1], "link": inp[2]}
        if len(inp) > 3:
            slot["widget"] = {"name": inp[3]}
        node["inputs"].append(slot)
    for k, (name, typ) in enumerate(outputs):
        node["outputs"].append({"name": name, "type": typ, "links": [], "slot_index": k})
    if widgets is not None:
        node["widgets_values"] = widgets if isinstance(widgets, dict) else list(widgets)
    node.update(extra)
    return node


def ui_workflow(nodes: list[dict], links: Sequence[tuple], version: float = 0.4, **extra: Any) -> dict:
    """An editor workflow; links: (id, origin_id, origin_slot, target_id, target_slot, type),
    written as arrays (version 0.4) or objects (version 1). Fills each output's `links`."""
    by_id = {n["id"]: n for n in nodes}
    for link_id, origin, oslot, _target, _tslot, _type in links:
        if origin in by_id and oslot < len(by_id[origin]["outputs"]):
            by_id[origin]["outputs"][oslot]["links"].append(link_id)
    fields = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    records = [dict(zip(fields, link)) if version == 1 else list(link) for link in links]
    wf: dict[str, Any] = {
        "last_node_id": max((n["id"] for n in nodes if isinstance(n["id"], int)), default=0),
        "last_link_id": max((link[0] for link in links), default=0),
        "nodes": nodes, "links": records, "groups": [], "config": {}, "extra": {}, "version": version,
    }
    if version == 1:
        wf.update(id="6019867a-604b-4d50-bb6d-26475d9f4aa9", revision=0, state={"lastNodeId": wf["last_node_id"]})
    wf.update(extra)
    return wf


def png_with_text(**chunks: Any) -> bytes:
    """An 8×8 PNG with one tEXt chunk per keyword argument (values written as JSON)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


# --- one txt2img graph in both formats ------------------------------------------------------

SAMPLER_INPUTS = (("model", "TOY_MODEL", 1), ("positive", "TOY_COND", 4), ("negative", "TOY_COND", 6),
                  ("latent", "LATENT", 2))
TXT2IMG_LINKS = (
    (1, 4, 0, 3, 0, "TOY_MODEL"), (2, 5, 0, 3, 3, "LATENT"), (3, 4, 1, 6, 0, "TOY_CLIP"), (4, 6, 0, 3, 1, "TOY_COND"),
    (5, 4, 1, 7, 0, "TOY_CLIP"), (6, 7, 0, 3, 2, "TOY_COND"), (7, 3, 0, 8, 0, "LATENT"), (8, 4, 2, 8, 1, "TOY_VAE"),
    (9, 8, 0, 9, 0, "IMAGE"),
)


def txt2img_ui_nodes(sampler_widgets: Any = (42, "randomize", 20, 7.5, "heun", 0.8, False)) -> list[dict]:
    """Editor nodes of the graph `txt2img_api()` describes (use with TXT2IMG_LINKS)."""
    return [
        ui_node(4, "Loader", outputs=[("model", "TOY_MODEL"), ("clip", "TOY_CLIP"), ("vae", "TOY_VAE")],
                widgets=["tiny.ckpt"]),
        ui_node(6, "Encode", [("clip", "TOY_CLIP", 3)], [("conditioning", "TOY_COND")], ["a cat"]),
        ui_node(7, "Encode", [("clip", "TOY_CLIP", 5)], [("conditioning", "TOY_COND")], ["blurry"]),
        ui_node(5, "EmptyLatent", outputs=[("LATENT", "LATENT")], widgets=[512, 768, 1]),
        ui_node(3, "Sampler", SAMPLER_INPUTS, [("LATENT", "LATENT")], sampler_widgets),
        ui_node(8, "Decode", [("samples", "LATENT", 7), ("vae", "TOY_VAE", 8)], [("IMAGE", "IMAGE")]),
        ui_node(9, "Save", [("images", "IMAGE", 9)], widgets=["ComfyUI"]),
    ]


def txt2img_api() -> dict:
    """The API prompt the editor queues for `txt2img_ui_nodes()` (a fresh copy each call)."""
    return {
        "4": {"class_type": "Loader", "inputs": {"ckpt_name": "tiny.ckpt"}},
        "6": {"class_type": "Encode", "inputs": {"clip": ["4", 1], "text": "a cat"}},
        "7": {"class_type": "Encode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatent", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        "3": {"class_type": "Sampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent": ["5", 0], "seed": 42,
            "steps": 20, "cfg": 7.5, "sampler_name": "heun", "denoise": 0.8, "add_noise": False}},
        "8": {"class_type": "Decode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "Save", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }
