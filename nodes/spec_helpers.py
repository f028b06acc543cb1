"""Short constructors for node specs, so each node reads as one declaration."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ldm_core.graph import spec

InputSpec, NodeSpec, OutputSpec = spec.InputSpec, spec.NodeSpec, spec.OutputSpec

CATEGORY_ROOT = "ldm"


def node(node_id: str, display: str, category: str, run: Callable[..., Any], inputs: Sequence[Any],
         outputs: Sequence[Any], description: str = "", **kw: Any) -> Any:
    return NodeSpec(node_id, display, f"{CATEGORY_ROOT}/{category}", run, tuple(inputs), tuple(outputs),
                    description, **kw)


def out(type_: str, name: str = "", tooltip: str = "") -> Any:
    return OutputSpec(type_, name, tooltip)


def socket(name: str, type_: str, tooltip: str = "", **kw: Any) -> Any:
    return InputSpec(name, type_, tooltip=tooltip, **kw)


def integer(name: str, default: int, lo: int, hi: int, tooltip: str = "", step: int = 1, **kw: Any) -> Any:
    return InputSpec(name, spec.INT, default, lo, hi, step, tooltip=tooltip, **kw)


def number(name: str, default: float, lo: float, hi: float, step: float, tooltip: str = "",
           round_: float | None = None, **kw: Any) -> Any:
    return InputSpec(name, spec.FLOAT, default, lo, hi, step, round_, tooltip=tooltip, **kw)


def text(name: str, default: str = "", tooltip: str = "", multiline: bool = False, **kw: Any) -> Any:
    return InputSpec(name, spec.STRING, default, multiline=multiline, tooltip=tooltip, **kw)


def combo(name: str, choices: Sequence[str] | Callable[[Any], Sequence[str]], tooltip: str = "",
          default: str | None = None, **kw: Any) -> Any:
    fixed = tuple(choices) if not callable(choices) else choices
    if default is None and not callable(fixed) and fixed:
        default = fixed[0]
    return InputSpec(name, spec.COMBO, default, choices=fixed, tooltip=tooltip, **kw)
