"""Node results kept between runs, keyed by an input signature.

A node's signature hashes what determines its result without looking at any tensor: its
type and spec version, its literal inputs, the signatures of the nodes it reads from
(with the output slot), and what its `is_changed` says. Upstream signatures are folded in
(a Merkle chain), so changing one widget changes exactly the signatures of that node and
its descendants, and only they run again. The node id is not part of the key (two
identical nodes share one result, as in ComfyUI) unless the node asks for its
`unique_id`, since its result may then depend on it.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeOutputs:
    """What a node produced: one value per output, and what an output node shows (ui)."""

    values: tuple[Any, ...]
    ui: Any = None


class OutputCache:
    """Results by signature, owned by the caller and kept across runs.

    `max_entries` and `max_bytes` bound it (least recently used dropped first); None keeps
    everything. Sizes come from `sizeof(values)`, given by the caller (the graph runtime
    knows no tensors): an entry larger than `max_bytes` on its own is not kept at all.
    `hits`/`misses` count lookups since creation (or `reset_stats`); `evicted` counts drops.
    """

    def __init__(self, max_entries: int | None = None, *, max_bytes: int | None = None,
                 sizeof: Callable[[tuple[Any, ...]], int] | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError("max_entries must be at least 1 (or None for no bound)")
        if max_bytes is not None and (max_bytes < 0 or sizeof is None):
            raise ValueError("max_bytes needs a sizeof function and must be ≥ 0 (or None for no bound)")
        self.max_entries, self.max_bytes, self.sizeof = max_entries, max_bytes, sizeof
        self._entries: OrderedDict[str, NodeOutputs] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.evicted = 0

    def get(self, signature: str) -> NodeOutputs | None:
        found = self._entries.get(signature)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(signature)
        return found

    def put(self, signature: str, outputs: NodeOutputs) -> None:
        self._entries[signature] = outputs
        self._entries.move_to_end(signature)
        if self.sizeof is not None:
            self._sizes[signature] = self.sizeof(outputs.values)
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used entries until the bounds hold."""
        while self._entries and (
            (self.max_entries is not None and len(self._entries) > self.max_entries)
            or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            oldest, _ = self._entries.popitem(last=False)
            self._sizes.pop(oldest, None)
            self.evicted += 1

    @property
    def nbytes(self) -> int:
        """Bytes held, as `sizeof` counts them (0 without one)."""
        return sum(self._sizes.values())

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()

    def reset_stats(self) -> None:
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, signature: object) -> bool:
        return signature in self._entries


class NeverCache:
    """Marker of an `is_changed` result that means "always run again" (ComfyUI's NaN idiom)."""


def signature(
    class_type: str,
    version: int,
    literals: Mapping[str, Any],
    upstream: Mapping[str, tuple[str, int]],
    changed: Any = None,
    node_id: str | None = None,
) -> str | None:
    """The cache key of one node run, or None when it must not be cached (is_changed
    returned NaN or raised). `upstream` maps input name → (source signature, slot)."""
    if isinstance(changed, NeverCache) or (isinstance(changed, float) and math.isnan(changed)):
        return None
    key = [
        class_type,
        version,
        sorted((name, canonical(value)) for name, value in literals.items()),
        sorted((name, sig, slot) for name, (sig, slot) in upstream.items()),
        canonical(changed),
        node_id,
    ]
    text = json.dumps(key, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def canonical(value: Any) -> Any:
    """A JSON-able stand-in for a value, equal for equal values: dicts with sorted keys,
    tuples as lists, anything not JSON by its type and repr (which is why a node must
    never receive a tensor as a literal)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ["__float__", repr(value)]
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Mapping):
        items = [(k if isinstance(k, str) else f"__key__{k!r}", canonical(v)) for k, v in value.items()]
        return {"__map__": sorted(items, key=lambda kv: kv[0])}
    return ["__repr__", f"{type(value).__module__}.{type(value).__qualname__}", repr(value)]
