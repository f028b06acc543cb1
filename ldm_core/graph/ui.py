"""The editor's own workflow format (LiteGraph serialisation, versions 0.4 and 1) → Prompt.

This does what the editor does when it queues a graph (its graphToPrompt): muted nodes are
dropped with every link from them; a bypassed node is removed and each consumer of one of
its outputs is wired to the bypassed node's matching input (transitively); reroutes pass
their input through; a PrimitiveNode's value replaces the links from it; notes and groups
are ignored. The editor stores widget values as a positional list, so mapping them to
names needs the node's spec (see `map_widgets`).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ldm_core.graph.graph_errors import WorkflowError
from ldm_core.graph.prompt_graph import Link, Prompt, PromptNode
from ldm_core.graph.spec import ANY, BOOLEAN, COMBO, STRING, InputSpec, NodeSpec
from ldm_core.graph.wiring import type_name, types_compatible

REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
EDITOR_ONLY = frozenset({"Note", "MarkdownNote"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
MODE_NEVER, MODE_BYPASS = 2, 4


@dataclass(frozen=True)
class _Input:
    name: str  # the input's name in the spec (a converted widget's widget name)
    type: str
    link: int | None


@dataclass(frozen=True)
class _Node:
    id: str
    type: str
    mode: int
    inputs: tuple[_Input, ...]
    output_types: tuple[str, ...]
    widgets_values: Any
    title: str | None
    where: str


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str | None


@dataclass(frozen=True)
class _Value:
    """A literal that replaces a link (a PrimitiveNode's value)."""

    value: Any


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, Mapping) and isinstance(data.get("nodes"), list)


def parse_ui(data: Mapping[str, Any], registry: Mapping[str, NodeSpec], ignore_types: Collection[str] = ()) -> Prompt:
    """Convert an editor workflow. `ignore_types` names more editor-only node types (from
    other packs' front-end extensions) to drop like notes."""
    if not is_ui_workflow(data):
        raise WorkflowError("an editor workflow must be an object with a 'nodes' list")
    _check_version(data.get("version"))
    subgraphs = _subgraph_names(data.get("definitions"))
    nodes = _read_nodes(data["nodes"])
    resolver = _Resolver(nodes, _read_links(data.get("links")), EDITOR_ONLY | set(ignore_types))
    prompt: Prompt = {}
    for node in nodes.values():
        if node.type in resolver.skip or node.type in (REROUTE, PRIMITIVE) or node.mode in (MODE_NEVER, MODE_BYPASS):
            continue
        if node.type in subgraphs:
            raise WorkflowError(
                f"node {node.id} is an instance of subgraph '{subgraphs[node.type]}'; subgraphs are not "
                "supported yet: unpack it in the editor (right-click → Unpack Subgraph) and save again",
                node.where,
            )
        if node.type.startswith(("workflow>", "workflow/")):
            raise WorkflowError(
                f"node {node.id} is a group node ({node.type}); group nodes are not supported: "
                "convert it to nodes in the editor and save again",
                node.where,
            )
        spec = registry.get(node.type)
        inputs = map_widgets(spec, node.widgets_values, node.where) if spec is not None else {}
        for idx, inp in enumerate(node.inputs):
            resolved = resolver.input(node, idx)
            if isinstance(resolved, Link):
                inputs[inp.name] = resolved  # a link wins over the widget value kept for it
            elif isinstance(resolved, _Value):
                inputs[inp.name] = resolved.value
        prompt[node.id] = PromptNode(node.type, inputs, node.title)
    if not prompt:
        raise WorkflowError("the workflow has no node to run (all are muted, bypassed, reroutes or notes)")
    return prompt


def map_widgets(spec: NodeSpec, values: Any, where: str = "") -> dict[str, Any]:
    """Name the editor's widget values after the spec's widget inputs.

    A list is assigned in order to `spec.widgets`. After a widget with
    control_after_generate the editor stores one more value ("fixed", "randomize", ...;
    a boolean in 2023 files); files from some tools lack it, so it is skipped only when the
    value is one of those and cannot be the next widget's own value. A dict maps by name. Widgets
    with no stored value get the spec default, as the editor shows its defaults for widgets
    a file predates; without a default they stay absent (validation reports them).
    """
    widgets = spec.widgets
    out: dict[str, Any] = {}
    if values is None:
        values = []
    if isinstance(values, Mapping):
        out = {w.name: values[w.name] for w in widgets if w.name in values}
    elif isinstance(values, list):
        i = 0
        for k, widget in enumerate(widgets):
            if i >= len(values):
                break
            out[widget.name] = values[i]
            i += 1
            if widget.control_after_generate and i < len(values) and _is_control(values, i, widgets[k + 1 :]):
                i += 1
    else:
        raise WorkflowError(f"'widgets_values' must be a list or an object, got {type(values).__name__}", where)
    for widget in widgets:
        if widget.name not in out:
            default = _editor_default(widget)
            if default is not None:
                out[widget.name] = default
    return out


def _is_control(values: list[Any], i: int, rest: tuple[InputSpec, ...]) -> bool:
    value = values[i]
    # Early (2023) editors stored the control as a boolean (true: randomize).
    if isinstance(value, bool):
        could_be_next = bool(rest) and rest[0].type == BOOLEAN
    elif isinstance(value, str) and value in CONTROL_VALUES:
        nxt = rest[0] if rest else None
        could_be_next = nxt is not None and (
            nxt.type == STRING or (nxt.type == COMBO and (callable(nxt.choices) or value in (nxt.choices or ()))))
    else:
        return False
    # No spare value for a control word: it must be the next widget's own value.
    return not (could_be_next and len(values) - i <= len(rest))


def _editor_default(widget: InputSpec) -> Any:
    if widget.default is not None:
        return widget.default
    if widget.type == COMBO and isinstance(widget.choices, tuple) and widget.choices:
        return widget.choices[0]  # the editor selects the first choice
    return None


class _Resolver:
    """Follows a link back through bypassed, reroute and primitive nodes to a real output."""

    def __init__(self, nodes: dict[str, _Node], links: dict[int, list[_Link]], skip: Collection[str]) -> None:
        self.nodes, self.links, self.skip = nodes, links, skip

    def input(self, node: _Node, idx: int, want: str | None = None, seen: set | None = None) -> Link | _Value | None:
        """What feeds input `idx` of `node`: a loop over the chain of reroute and bypassed nodes
        (not recursion, so a chain of thousands cannot exhaust the stack)."""
        seen = set() if seen is None else seen
        while True:
            self._visit(seen, (node.id, "in", idx), node)
            inp = node.inputs[idx]
            if inp.link is None:
                return None
            records = self.links.get(inp.link)
            if not records:
                raise WorkflowError(f"input '{inp.name}' uses link {inp.link}, which is not in the workflow's links",
                                    node.where)
            # Some saved files repeat a link id; the record that targets this node is the real one.
            rec = next((r for r in records if r.target_id == node.id), records[0])
            want = want or inp.type
            src, slot = self.nodes.get(rec.origin_id), rec.origin_slot
            if src is None:
                return Link(rec.origin_id, slot)  # validation reports the missing node, with the rest
            self._visit(seen, (src.id, "out", slot), src)
            if src.mode == MODE_BYPASS:
                idx, want = _bypass_input(src, slot, want), None
                if idx < 0:
                    return None  # the consumer's input is left unconnected
            elif src.type == REROUTE:
                if slot >= len(src.inputs):
                    return None
                idx = slot
            else:
                return self._source(src, slot)
            node = src

    def _source(self, src: _Node, slot: int) -> Link | _Value | None:
        """A real node's output, a primitive's value, or None for a skipped or muted node."""
        if src.type == PRIMITIVE:
            values = src.widgets_values
            if isinstance(values, list) and values:
                return _Value(values[0])
            if isinstance(values, Mapping) and values:
                return _Value(next(iter(values.values())))
            return None
        if src.type in self.skip or src.mode == MODE_NEVER:
            return None
        return Link(src.id, slot)

    @staticmethod
    def _visit(seen: set, key: tuple, node: _Node) -> None:
        if key in seen:
            raise WorkflowError(f"links loop through reroute/bypassed node {node.id} without reaching a real node", node.where)
        seen.add(key)


def _bypass_input(node: _Node, slot: int, want: str) -> int:
    """The input a bypassed node passes to its output `slot` for a consumer of type `want`:
    the input at the same index if its type fits, else the first input of exactly that type,
    else the first compatible one; -1 if none (the consumer's input is left unconnected)."""
    inputs = node.inputs
    if want in (ANY, ""):
        return slot if slot < len(inputs) else (0 if inputs else -1)
    out_type = node.output_types[slot] if slot < len(node.output_types) else ANY
    if slot < len(inputs) and types_compatible(inputs[slot].type, out_type) and types_compatible(inputs[slot].type, want):
        return slot
    exact = [i for i, inp in enumerate(inputs) if inp.type == want]
    if exact:
        return exact[0]
    fits = [i for i, inp in enumerate(inputs) if types_compatible(inp.type, out_type) and types_compatible(inp.type, want)]
    return fits[0] if fits else -1


def _check_version(version: Any) -> None:
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, (int, float)) or not 0.4 <= version < 2:
        raise WorkflowError(f"unsupported workflow version {version!r}: this loader reads versions 0.4 and 1", "version")


def _subgraph_names(definitions: Any) -> dict[str, str]:
    if not isinstance(definitions, Mapping):
        return {}
    subgraphs = definitions.get("subgraphs")
    if not isinstance(subgraphs, list):
        return {}
    out = {}
    for sg in subgraphs:
        if isinstance(sg, Mapping) and isinstance(sg.get("id"), str):
            name = sg.get("name")
            out[sg["id"]] = name if isinstance(name, str) else sg["id"]
    return out


def _read_nodes(raw_nodes: list[Any]) -> dict[str, _Node]:
    nodes: dict[str, _Node] = {}
    for k, raw in enumerate(raw_nodes):
        where = f"nodes[{k}]"
        if not isinstance(raw, Mapping):
            raise WorkflowError(f"a node must be an object, got {type(raw).__name__}", where)
        node_id = _id(raw.get("id"), f"{where}.id")
        where = f"nodes[{k}] (id {node_id})"
        ntype = raw.get("type")
        if not isinstance(ntype, str) or not ntype:
            raise WorkflowError("node has no 'type'", where)
        mode = raw.get("mode", 0)
        if mode is None:
            mode = 0
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise WorkflowError(f"'mode' must be an integer, got {mode!r}", where)
        inputs = tuple(_read_input(x, f"{where}.inputs[{j}]") for j, x in enumerate(_list(raw.get("inputs"), f"{where}.inputs")))
        outputs = _list(raw.get("outputs"), f"{where}.outputs")
        output_types = tuple(type_name(o.get("type")) if isinstance(o, Mapping) else ANY for o in outputs)
        title = raw.get("title")
        if node_id in nodes:
            raise WorkflowError(f"node id {node_id} appears twice", where)
        nodes[node_id] = _Node(node_id, ntype, mode, inputs, output_types, raw.get("widgets_values"),
                               title if isinstance(title, str) else None, where)
    return nodes


def _read_input(raw: Any, where: str) -> _Input:
    if not isinstance(raw, Mapping):
        raise WorkflowError(f"an input slot must be an object, got {type(raw).__name__}", where)
    name = raw.get("name")
    widget = raw.get("widget")
    if isinstance(widget, Mapping) and isinstance(widget.get("name"), str):
        name = widget["name"]
    if not isinstance(name, str):
        raise WorkflowError("input slot has no 'name'", where)
    link = raw.get("link")
    if link is not None and (isinstance(link, bool) or not isinstance(link, int)):
        raise WorkflowError(f"'link' must be a link id (integer) or null, got {link!r}", where)
    return _Input(name, type_name(raw.get("type")), link)


def _read_links(raw_links: Any) -> dict[int, list[_Link]]:
    links: dict[int, list[_Link]] = {}
    for k, raw in enumerate(_list(raw_links, "links")):
        if raw is None:
            continue
        where = f"links[{k}]"
        if isinstance(raw, list):  # version 0.4: [id, origin_id, origin_slot, target_id, target_slot, type]
            if len(raw) < 5:
                raise WorkflowError(f"a link must be [id, origin_id, origin_slot, target_id, target_slot, type], got {raw!r}", where)
            link_id, origin, origin_slot, target = raw[0], raw[1], raw[2], raw[3]
        elif isinstance(raw, Mapping):  # version 1
            link_id, origin, origin_slot, target = (raw.get(key) for key in ("id", "origin_id", "origin_slot", "target_id"))
        else:
            raise WorkflowError(f"a link must be a list or an object, got {type(raw).__name__}", where)
        if isinstance(link_id, bool) or not isinstance(link_id, int):
            raise WorkflowError(f"link id must be an integer, got {link_id!r}", where)
        if isinstance(origin_slot, bool) or not isinstance(origin_slot, int) or origin_slot < 0:
            raise WorkflowError(f"origin_slot must be a non-negative integer, got {origin_slot!r}", where)
        target_id = _id(target, where) if target is not None else None
        links.setdefault(link_id, []).append(_Link(_id(origin, where), origin_slot, target_id))
    return links


def _id(raw: Any, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or raw == "":
        raise WorkflowError(f"a node id must be an integer or a non-empty string, got {raw!r}", where)
    return str(raw)


def _list(raw: Any, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise WorkflowError(f"must be a list, got {type(raw).__name__}", where)
    return raw
