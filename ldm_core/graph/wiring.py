"""When an output may feed an input: the one rule shared by validation and by the editor
format's bypass resolution, so both agree on what "same type" means.

Types are names ("LATENT", "INT"); "*" (or an empty name) accepts anything; a name may be
a comma-separated union ("INT,FLOAT"), compatible when the two sets share a member (the
rule of both ComfyUI's validator and the editor's LiteGraph). Names compare exactly, as in
ComfyUI's backend.
"""
from __future__ import annotations

from typing import Any

from ldm_core.graph.spec import ANY


def type_name(raw: Any) -> str:
    """A socket type as the editor stores it, as a name: old files store a COMBO input's
    type as its list of choices; LiteGraph's event slots use negative numbers."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        return "COMBO"
    if raw is None or raw == 0:
        return ANY
    return f"<{raw!r}>"


def types_compatible(a: str, b: str) -> bool:
    if a == b or a in (ANY, "") or b in (ANY, ""):
        return True
    if "," not in a and "," not in b:
        return False
    return bool({t.strip() for t in a.split(",")} & {t.strip() for t in b.split(",")})
