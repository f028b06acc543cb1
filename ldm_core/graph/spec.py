"""Declarative node specs: the one description of a node that both the ComfyUI adapter and
the headless runner read, so the editor's metadata and the runner's can never disagree.

No torch here: specs are plain data plus a reference to the function that runs the node.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Widget (literal) types; every other type name is a socket type carried by a link.
INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})
ANY = "*"  # accepts any socket type (reroutes, previews)


@dataclass(frozen=True)
class InputSpec:
    """One input of a node.

    `type` is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO) or a socket type name
    (IMAGE, LATENT, LDM_MODEL, ...). COMBO `choices` is a fixed tuple or a function of the
    run context returning the current list (files in a models folder, say).
    `control_after_generate`: the editor stores one extra widget value after this one
    ("fixed", "randomize", ...) in a workflow's widgets_values.
    """

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    choices: tuple[str, ...] | Callable[[Any], Sequence[str]] | None = None
    multiline: bool = False
    optional: bool = False
    tooltip: str = ""
    control_after_generate: bool = False
    force_input: bool = False  # a widget type shown as a socket
    image_upload: bool = False  # the editor shows an upload button that adds files to the choices
    # check(value, context) -> what is wrong with a literal value (None: nothing), run at validation
    check: Callable[[Any, Any], str | None] | None = None
    # choices_source(context) -> where a COMBO's choices come from ("the files in …"), for messages
    choices_source: Callable[[Any], str] | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def choice_list(self, context: Any = None) -> list[str]:
        if self.choices is None:
            return []
        if callable(self.choices):
            return list(self.choices(context))
        return list(self.choices)


@dataclass(frozen=True)
class OutputSpec:
    type: str
    name: str = ""
    tooltip: str = ""

    @property
    def label(self) -> str:
        return self.name or self.type


@dataclass(frozen=True)
class NodeSpec:
    """A node type. `run(context, **inputs)` returns one value per output (a tuple), or, for
    output nodes, may also return a dict {"ui": ..., "result": tuple}.

    `version` is part of every cache key: bump it when the node's results change.
    `is_changed(context, **inputs)` returns a value whose change forces a re-run even when
    the inputs are the same (a file on disk that was edited, say).
    """

    id: str
    display_name: str
    category: str
    run: Callable[..., Any]
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    description: str = ""
    output_node: bool = False
    version: int = 1
    is_changed: Callable[..., Any] | None = None
    hidden: tuple[str, ...] = ()  # ComfyUI hidden inputs it wants: "prompt", "extra_pnginfo", "unique_id"

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> tuple[InputSpec, ...]:
        """Widget inputs in the order the editor stores their values (required, then optional)."""
        req = [i for i in self.inputs if i.is_widget and not i.optional]
        opt = [i for i in self.inputs if i.is_widget and i.optional]
        return tuple(req + opt)
