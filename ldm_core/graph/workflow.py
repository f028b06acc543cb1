"""Load a saved workflow, whatever its form, into a `Prompt`.

Accepted: ComfyUI's API format (also wrapped as {"prompt": {...}}, the body of a POST to
/prompt), the editor's UI format (versions 0.4 and 1), JSON text or bytes, a path to a
.json file, and a PNG (or any image Pillow reads) whose text chunks carry a workflow, as
ComfyUI's SaveImage writes it
(a PNG is recognised by its signature, not its file name). Anything malformed raises WorkflowError and nothing else.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Collection, Mapping
from typing import Any, Literal

from ldm_core.graph.graph_errors import WorkflowError
from ldm_core.graph.prompt_graph import Prompt, PromptNode, as_prompt, is_api_node, parse_api
from ldm_core.graph.spec import NodeSpec
from ldm_core.graph.ui import is_ui_workflow, parse_ui

Format = Literal["api", "ui"]
Prefer = Literal["prompt", "workflow"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_workflow(
    source: Any,
    registry: Mapping[str, NodeSpec],
    *,
    prefer: Prefer = "prompt",
    ignore_types: Collection[str] = (),
) -> Prompt:
    """Read `source` (a mapping, JSON text or bytes, a path, PNG bytes) into a Prompt.

    `prefer` picks the chunk of an image that carries both: "prompt" (default) or
    "workflow". `ignore_types` names extra editor-only node types to drop (UI format).
    """
    if prefer not in ("prompt", "workflow"):
        raise WorkflowError(f"prefer must be 'prompt' or 'workflow', got {prefer!r}")
    if isinstance(source, Mapping) and source and all(isinstance(v, PromptNode) for v in source.values()):
        return as_prompt(source)
    data = read_source(source, prefer)
    fmt, payload = detect_format(data)
    if fmt == "api":
        return parse_api(payload)
    return parse_ui(payload, registry, ignore_types)


def detect_format(data: Any) -> tuple[Format, Any]:
    """Which format `data` is in, and the part to parse (the API wrapper removed)."""
    if is_ui_workflow(data):
        return "ui", data
    if isinstance(data, Mapping) and data:
        inner = data.get("prompt")
        if isinstance(inner, Mapping) and not is_api_node(inner) and not is_api_node(data):
            return "api", inner
        # One node with class_type makes it a prompt: parse_api then names the node that lacks one.
        if all(isinstance(v, Mapping) for v in data.values()) and any(is_api_node(v) for v in data.values()):
            return "api", data
    raise WorkflowError(
        "not a ComfyUI workflow: expected an API prompt {id: {\"class_type\": ..., \"inputs\": {...}}}, "
        "that prompt wrapped as {\"prompt\": ...}, or an editor workflow with 'nodes' and 'links'"
    )


def read_source(source: Any, prefer: Prefer = "prompt") -> Any:
    """The parsed JSON value of `source`, whatever carries it."""
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), prefer, "data")
    if isinstance(source, str) and source.lstrip().startswith(("{", "[")) and not os.path.isfile(source):
        return parse_json(source, "text")  # JSON text; a file whose name starts with "[" or "{" is read
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except (OSError, ValueError) as exc:
            raise WorkflowError(f"cannot read the workflow file: {exc}", str(source)) from exc
        return _from_bytes(raw, prefer, str(source))
    raise WorkflowError(f"cannot load a workflow from a {type(source).__name__}: give a path, JSON text or bytes, or a dict")


def _from_bytes(raw: bytes, prefer: Prefer, where: str) -> Any:
    if raw.startswith(PNG_MAGIC):
        return read_image_workflow(raw, prefer, where)
    return parse_json(raw, where)


def parse_json(raw: str | bytes, where: str = "text") -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WorkflowError(f"not valid JSON: {exc}", where) from exc


def read_image_workflow(raw: bytes, prefer: Prefer = "prompt", where: str = "image") -> Any:
    """The workflow an image carries in its text chunks ("prompt": API JSON, "workflow": UI JSON).

    The "prompt" chunk is preferred by default: it is exactly the graph that made the
    image, already resolved by the editor (bypasses, primitives, front-end-only nodes) and
    keyed by input name, so it runs the same even after a node's widget list changed; the
    "workflow" chunk is for editing. Ask for "workflow" to get what the editor would load.
    """
    from PIL import Image  # lazily: only images need Pillow

    if prefer not in ("prompt", "workflow"):
        raise WorkflowError(f"prefer must be 'prompt' or 'workflow', got {prefer!r}")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            chunks = dict(im.info)
            if "prompt" not in chunks and "workflow" not in chunks:
                chunks.update(getattr(im, "text", {}) or {})  # text chunks after the pixels
    except Exception as exc:  # Pillow raises many types on a damaged file; all mean the same here
        raise WorkflowError(f"cannot read the image: {exc}", where) from exc
    order = ("prompt", "workflow") if prefer == "prompt" else ("workflow", "prompt")
    for key in order:
        text = chunks.get(key)
        if isinstance(text, (str, bytes)):
            return parse_json(text, f"{where} ({key} chunk)")
    raise WorkflowError("the image carries no workflow (no 'prompt' or 'workflow' text chunk)", where)
