"""Check a prompt against the node registry before anything runs, reporting every problem.

Each issue names the node, its type, the input, a stable code (below) and what to do.
Decisions where ComfyUI differs or is silent:

- Values are checked strictly: an INT is an int (a float with an integral value, as JSON
  may write 5.0, is accepted and runs as an int; True is not an int), a FLOAT a finite
  int or float, a STRING a str, a BOOLEAN a bool. ComfyUI converts with int()/str()/bool(),
  so "5" passes and "false" becomes True; the editor never writes numbers as strings, so
  a string in a number widget almost always means the widget order changed. Refused here.
- A required input that is absent is an error, widgets included, as in ComfyUI's API
  format. Defaults are not filled in here: the editor-format loader fills the widgets a
  file lacks from the spec defaults (as the editor shows them), and an absent optional
  input is simply not passed, so the node's own default applies.
- `unknown_input` (an input the node type does not have) is a warning: ComfyUI ignores
  extra inputs, and the runner drops them. A renamed input that mattered still shows up
  as `missing_required_input`.
- Only nodes that the requested outputs need can stop a run; problems in other nodes
  are reported as warnings (ComfyUI does not look at them at all). An unknown node type
  is always an error: what it would have done is unknowable.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from ldm_core.graph.graph_errors import Severity, ValidationError, ValidationIssue
from ldm_core.graph.prompt_graph import Link, Prompt, PromptNode, as_prompt, node_sort_key
from ldm_core.graph.spec import ANY, BOOLEAN, COMBO, FLOAT, INT, STRING, WIDGET_TYPES, InputSpec, NodeSpec
from ldm_core.graph.topology import cycles, dependencies, needed
from ldm_core.graph.wiring import types_compatible

UNKNOWN_NODE_TYPE = "unknown_node_type"
MISSING_REQUIRED_INPUT = "missing_required_input"
LINK_TO_MISSING_NODE = "link_to_missing_node"
BAD_OUTPUT_SLOT = "bad_output_slot"
TYPE_MISMATCH = "type_mismatch"
INVALID_VALUE_TYPE = "invalid_value_type"
VALUE_OUT_OF_RANGE = "value_out_of_range"
VALUE_NOT_IN_LIST = "value_not_in_list"
CHOICES_UNAVAILABLE = "choices_unavailable"
CYCLE = "cycle"
NO_OUTPUT_NODE = "no_output_node"
UNKNOWN_OUTPUT_REQUESTED = "unknown_output_requested"
UNKNOWN_INPUT = "unknown_input"
INVALID_VALUE = "invalid_value"  # a value the input's own check refuses

_PY_TYPE = MappingProxyType({INT: "an integer", FLOAT: "a number", STRING: "a string", BOOLEAN: "true or false"})


def validate(
    prompt: Mapping[str, Any],
    registry: Mapping[str, NodeSpec],
    context: Any = None,
    outputs: Sequence[str] | None = None,
) -> list[ValidationIssue]:
    """Every problem of `prompt` (errors and warnings), sorted by node. `context` is given
    to COMBO choice functions; `outputs` are the node ids to run (default: output nodes)."""
    prompt = as_prompt(prompt)
    deps = dependencies(prompt, registry)
    targets, issues = select_outputs(prompt, registry, outputs)
    need = needed(deps, targets)
    for node_id in sorted(prompt, key=node_sort_key):
        for issue in _node_issues(node_id, prompt[node_id], prompt, registry, context):
            if node_id not in need and issue.code != UNKNOWN_NODE_TYPE:
                issue = replace(issue, severity="warning", message=issue.message + " (no requested output uses this node)")
            issues.append(issue)
    for component in cycles(deps):
        members = sorted(component, key=node_sort_key)
        first = prompt[members[0]]
        issues.append(ValidationIssue(
            CYCLE,
            f"nodes {', '.join(members)} feed each other in a loop; a graph must be acyclic: remove one of these links",
            members[0], first.class_type, None, "error" if need & set(members) else "warning",
        ))
    issues.sort(key=lambda i: (0, (0, 0)) if i.node_id is None else (1, node_sort_key(i.node_id)))
    return issues


def check(
    prompt: Mapping[str, Any],
    registry: Mapping[str, NodeSpec],
    context: Any = None,
    outputs: Sequence[str] | None = None,
) -> list[ValidationIssue]:
    """Raise ValidationError (with every issue) if the prompt has any error; else return
    its warnings."""
    issues = validate(prompt, registry, context, outputs)
    if any(i.severity == "error" for i in issues):
        raise ValidationError(issues)
    return issues


def select_outputs(
    prompt: Prompt, registry: Mapping[str, NodeSpec], outputs: Sequence[str] | None
) -> tuple[list[str], list[ValidationIssue]]:
    """The node ids to run: those asked for, or every node whose type is an output node."""
    if outputs is None:
        found = [n for n in sorted(prompt, key=node_sort_key) if _is_output(prompt[n], registry)]
        if found:
            return found, []
        return [], [ValidationIssue(
            NO_OUTPUT_NODE,
            "the workflow has no output node (one that saves or previews a result), so running it would do "
            "nothing: add one, or name the nodes to run",
        )]
    issues = []
    for node_id in outputs:
        if node_id not in prompt:
            issues.append(ValidationIssue(UNKNOWN_OUTPUT_REQUESTED, f"node {node_id} was asked for but is not in the workflow", str(node_id)))
    return [n for n in outputs if n in prompt], issues


def _is_output(node: PromptNode, registry: Mapping[str, NodeSpec]) -> bool:
    spec = registry.get(node.class_type) if isinstance(node.class_type, str) else None
    return spec is not None and spec.output_node


def _node_issues(node_id: str, node: PromptNode, prompt: Prompt, registry: Mapping[str, NodeSpec], context: Any) -> Iterable[ValidationIssue]:
    ct = node.class_type

    def issue(code: str, message: str, input_name: str | None = None, severity: Severity = "error") -> ValidationIssue:
        return ValidationIssue(code, message, node_id, ct, input_name, severity)

    spec = registry.get(ct) if isinstance(ct, str) else None
    if spec is None:
        hint = difflib.get_close_matches(str(ct), [k for k in registry if isinstance(k, str)], n=1)
        yield issue(UNKNOWN_NODE_TYPE, f"node type '{ct}' is not registered: install the pack that provides it or "
                    "replace the node" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        for name, value in node.inputs.items():
            if isinstance(value, Link) and value.node_id not in prompt:
                yield issue(LINK_TO_MISSING_NODE, _missing_msg(value), name)
        return
    for name, value in node.inputs.items():
        inp = spec.input(name)
        if inp is None:
            yield issue(UNKNOWN_INPUT, f"'{ct}' has no input '{name}'; the value is ignored", name, "warning")
        elif isinstance(value, Link):
            yield from (issue(c, m, name) for c, m in _link_problems(inp, value, prompt, registry))
        else:
            yield from (issue(c, m, name) for c, m in _value_problems(inp, value, context))
    for inp in spec.inputs:
        if not inp.optional and inp.name not in node.inputs:
            what = f"a value of type {inp.type}" if inp.is_widget else f"a link from an output of type {inp.type}"
            yield issue(MISSING_REQUIRED_INPUT, f"required input '{inp.name}' is missing: give it {what}", inp.name)


def _missing_msg(link: Link) -> str:
    return f"linked to node {link.node_id}, which is not in the workflow (deleted or muted?): reconnect this input"


def _link_problems(inp: InputSpec, link: Link, prompt: Prompt, registry: Mapping[str, NodeSpec]) -> Iterable[tuple[str, str]]:
    src = prompt.get(link.node_id)
    if src is None:
        yield LINK_TO_MISSING_NODE, _missing_msg(link)
        return
    src_spec = registry.get(src.class_type) if isinstance(src.class_type, str) else None
    if src_spec is None:
        return  # reported on the source node
    n = len(src_spec.outputs)
    if not 0 <= link.slot < n:
        yield BAD_OUTPUT_SLOT, (f"linked to output {link.slot} of node {link.node_id} ({src.class_type}), which has "
                                f"{n} output{'s' * (n != 1)}: reconnect this input")
        return
    out = src_spec.outputs[link.slot]
    if not types_compatible(out.type, inp.type):
        yield TYPE_MISMATCH, (f"expects {inp.type} but node {link.node_id} ({src.class_type}) output "
                              f"{link.slot} '{out.label}' gives {out.type}: connect a {inp.type} output")


def _value_problems(inp: InputSpec, value: Any, context: Any) -> Iterable[tuple[str, str]]:
    if inp.type in (ANY, ""):
        return
    if inp.type not in WIDGET_TYPES:
        yield INVALID_VALUE_TYPE, (f"takes a {inp.type} from another node's output, not a value "
                                   f"(got {_show(value)}): connect a {inp.type} output")
        return
    if inp.type == COMBO:
        yield from _combo_problems(inp, value, context)
        return
    if not value_has_type(inp.type, value):
        yield INVALID_VALUE_TYPE, (f"must be {_PY_TYPE[inp.type]}, got {_show(value)} ({type(value).__name__}); "
                                   "if the widget values are shifted, the node's widget order changed: re-enter them")
        return
    if inp.type in (INT, FLOAT):
        if inp.min is not None and value < inp.min:
            yield VALUE_OUT_OF_RANGE, f"{_show(value)} is below the minimum {inp.min:g}: use a value in [{_range(inp)}]"
            return
        elif inp.max is not None and value > inp.max:
            yield VALUE_OUT_OF_RANGE, f"{_show(value)} is above the maximum {inp.max:g}: use a value in [{_range(inp)}]"
            return
    if inp.check is not None:
        try:
            problem = inp.check(value, context)
        except Exception as exc:  # a check reads the disk or a config: report, don't crash
            problem = f"could not be checked: {type(exc).__name__}: {exc}"
        if problem:
            yield INVALID_VALUE, problem


def _combo_problems(inp: InputSpec, value: Any, context: Any) -> Iterable[tuple[str, str]]:
    if inp.choices is None:
        return
    try:
        choices = inp.choice_list(context)
    except Exception as exc:  # a choice function reads the disk or a config: report, don't crash
        yield CHOICES_UNAVAILABLE, f"could not list the choices: {type(exc).__name__}: {exc}"
        return
    try:
        ok = value in choices
    except Exception:
        ok = False
    if ok:
        return
    source = ""
    if inp.choices_source is not None:
        try:
            source = f" ({inp.choices_source(context)})"
        except Exception:  # noqa: BLE001 - only decorates the message
            source = ""
    if not choices:
        yield VALUE_NOT_IN_LIST, (f"{_show(value)} is not available: there are no choices{source}"
                                  + ("" if source else " (is the folder empty?)"))
        return
    shown = ", ".join(map(str, choices[:20])) + (f", ... ({len(choices)} in all)" if len(choices) > 20 else "")
    hint = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1) if isinstance(value, str) else []
    yield VALUE_NOT_IN_LIST, (f"{_show(value)} is not one of the choices{source}: {shown}"
                              + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def value_has_type(kind: str, value: Any) -> bool:
    """Whether a literal is acceptable for a widget type (see the module docstring)."""
    if kind == INT:
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if kind == FLOAT:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == STRING:
        return isinstance(value, str)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    return True


def coerce(inp: InputSpec, value: Any) -> Any:
    """The value a node receives for a validated literal: 5.0 → 5 for INT, 5 → 5.0 for FLOAT."""
    if inp.type == INT and isinstance(value, float):
        return int(value)
    if inp.type == FLOAT and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _range(inp: InputSpec) -> str:
    lo = "-inf" if inp.min is None else f"{inp.min:g}"
    hi = "inf" if inp.max is None else f"{inp.max:g}"
    return f"{lo}, {hi}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
