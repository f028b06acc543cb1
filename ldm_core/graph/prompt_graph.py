"""The one normalised form every workflow is loaded into, and ComfyUI's API ("prompt") format.

A `Prompt` maps node ids (strings) to `PromptNode(class_type, inputs)`; an input is either
a literal widget value or a `Link` to an output slot of another node. This is the meaning
of ComfyUI's API format, with one ambiguity removed: there a two-element list is a link
and a list literal must be wrapped as {"__value__": [...]}; here a link is its own type,
so a list is always a literal.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ldm_core.graph.graph_errors import WorkflowError


@dataclass(frozen=True)
class Link:
    """Output `slot` (0-based) of node `node_id`."""

    node_id: str
    slot: int


@dataclass
class PromptNode:
    """One node to run: its type and its inputs (literal values or Links).

    `title` is the editor's title when the node came from a UI workflow (for messages only).
    """

    class_type: str
    inputs: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


Prompt = dict[str, PromptNode]


def node_sort_key(node_id: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then the rest by name: "2" < "10" < "a"."""
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def is_api_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_type" in value


def parse_api(data: Any, where: str = "prompt") -> Prompt:
    """Read an API-format prompt `{id: {"class_type": str, "inputs": {name: value}}}`.

    A missing "inputs" reads as none (a node without inputs). `_meta.title` is kept as the
    title. Raises WorkflowError naming the node and input of anything malformed.
    """
    if not isinstance(data, Mapping):
        raise WorkflowError(f"an API prompt must be an object of nodes, got {type(data).__name__}", where)
    if not data:
        raise WorkflowError("the prompt has no nodes", where)
    prompt: Prompt = {}
    for raw_id, raw in data.items():
        node_id = _node_id(raw_id, where)
        at = f"{where}[{node_id!r}]"
        if not isinstance(raw, Mapping):
            raise WorkflowError(f"a node must be an object, got {type(raw).__name__}", at)
        class_type = raw.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise WorkflowError("node has no 'class_type' (the node type name)", at)
        raw_inputs = raw.get("inputs", {})
        if raw_inputs is None:
            raw_inputs = {}
        if not isinstance(raw_inputs, Mapping):
            raise WorkflowError(f"'inputs' must be an object, got {type(raw_inputs).__name__}", at)
        inputs = {}
        for name, value in raw_inputs.items():
            if not isinstance(name, str):
                raise WorkflowError(f"input names must be strings, got {name!r}", at)
            inputs[name] = _api_value(value, f"{at}.inputs[{name!r}]")
        meta = raw.get("_meta")
        title = meta.get("title") if isinstance(meta, Mapping) else None
        if node_id in prompt:
            raise WorkflowError(f"node id {node_id!r} appears twice", where)
        prompt[node_id] = PromptNode(class_type, inputs, title if isinstance(title, str) else None)
    return prompt


def _node_id(raw: Any, where: str) -> str:
    # JSON object keys are strings; the editor's ids are ints. bool is an int in Python: refuse it.
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise WorkflowError(f"a node id must be a string or an integer, got {raw!r}", where)
    node_id = str(raw)
    if not node_id:
        raise WorkflowError("empty node id", where)
    return node_id


def _api_value(value: Any, where: str) -> Any:
    if isinstance(value, list):
        # ComfyUI reads every list as a link [source_id, output_index].
        if len(value) != 2 or isinstance(value[1], bool) or not isinstance(value[1], int) or value[1] < 0:
            raise WorkflowError(
                f"a link must be [node_id, output_index] with a non-negative integer index, got {value!r} "
                "(wrap a list literal as {\"__value__\": [...]})",
                where,
            )
        return Link(_node_id(value[0], where), value[1])
    if isinstance(value, Mapping) and set(value) == {"__value__"}:
        return value["__value__"]
    return value


def to_api(prompt: Mapping[str, PromptNode]) -> dict[str, Any]:
    """The API-format JSON object of a prompt (what ComfyUI's /prompt accepts)."""
    out: dict[str, Any] = {}
    for node_id, node in prompt.items():
        inputs: dict[str, Any] = {}
        for name, value in node.inputs.items():
            if isinstance(value, Link):
                inputs[name] = [value.node_id, value.slot]
            elif isinstance(value, (list, tuple)):
                inputs[name] = {"__value__": list(value)}
            else:
                inputs[name] = value
        entry: dict[str, Any] = {"class_type": node.class_type, "inputs": inputs}
        if node.title:
            entry["_meta"] = {"title": node.title}
        out[node_id] = entry
    return out


def as_prompt(obj: Any) -> Prompt:
    """Accept a Prompt as is, or read an API-format mapping into one."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, PromptNode) for v in obj.values()):
        for node_id, node in obj.items():
            if not isinstance(node_id, str) or not isinstance(node.class_type, str) or not isinstance(node.inputs, Mapping):
                raise WorkflowError("a Prompt maps string ids to PromptNode(class_type: str, inputs: dict)", repr(node_id))
        return dict(obj)
    return parse_api(obj)
