"""Run a prompt: validate it, run what the requested outputs need in dependency order, and
reuse every result whose input signature was seen before (see cache.py).

A failing node does not stop the run: nodes that depend on it are skipped, every other
branch still runs, and the result lists every failure, so a command line can print them
all and exit non-zero (`run` raises ExecutionFailed at the end, or returns the result
with `raise_on_failure=False`).

Hooks: any object with some of `on_run_start(node_ids)` (the nodes about to run, in order),
`on_node_start(node_id, class_type)`, `on_node_done(node_id,
class_type, cached)`, `on_node_error(node_id, class_type, error)` and `on_progress(node_id,
class_type, done, total, preview)`; `Hooks` is a no-op base to subclass. A node reports
sub-progress (sampler steps, tiles) by listing "progress" in `NodeSpec.hidden`: it is then
called with `progress=`, a `NodeProgress` (start/update/finish, the shape of
`ldm_core.progress.Progress`) that forwards to `on_progress`. To cancel a run, raise an
exception that is not an `Exception` (KeyboardInterrupt, say) from a hook: it is never
caught here. Exceptions from hooks outside a node's run also propagate unchanged.

Other hidden inputs a node may list: "prompt" (the API-format prompt), "extra_pnginfo"
(given to `run`), "unique_id" (its node id; it then joins the cache key).

Memory: a node's outputs are held by the run only until the last node that reads them has
run (reference counts over the nodes still to run); `RunResult.outputs` keeps every node's
values only when asked (`keep_outputs=True`, the default for callers that inspect them),
else just those of the requested output nodes. What outlives a run is the cache's to keep.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldm_core.graph.cache import NeverCache, NodeOutputs, OutputCache, signature
from ldm_core.graph.graph_errors import ExecutionFailed, NodeExecutionError, ValidationIssue
from ldm_core.graph.prompt_graph import Link, Prompt, PromptNode, as_prompt, to_api
from ldm_core.graph.spec import NodeSpec
from ldm_core.graph.topology import Deps, dependencies, run_order
from ldm_core.graph.validate import check, coerce, select_outputs


class Hooks:
    """Progress callbacks; override any of them."""

    def on_run_start(self, node_ids: list[str]) -> None:
        pass

    def on_node_start(self, node_id: str, class_type: str) -> None:
        pass

    def on_node_done(self, node_id: str, class_type: str, cached: bool) -> None:
        pass

    def on_node_error(self, node_id: str, class_type: str, error: NodeExecutionError) -> None:
        pass

    def on_progress(self, node_id: str, class_type: str, done: int, total: int, preview: Any = None) -> None:
        pass


class NodeProgress:
    """Sub-progress of one running node, forwarded to the hooks' `on_progress`."""

    def __init__(self, hooks: Any, node_id: str, class_type: str) -> None:
        self._hook = getattr(hooks, "on_progress", None)
        self.node_id, self.class_type = node_id, class_type
        self.total = 0

    def start(self, total: int) -> None:
        self.total = total
        self.update(0, total)

    def update(self, done: int, total: int, preview: Any = None) -> None:
        if self._hook is not None:
            self._hook(self.node_id, self.class_type, done, total, preview)

    def finish(self) -> None:
        pass


@dataclass
class RunResult:
    """What a run did. `outputs` has the values of every node that ran or came from the
    cache; `skipped` maps a node to the failed node it waited on."""

    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, Any] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: dict[str, NodeExecutionError] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[ValidationIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        lines = [f"ran {len(self.executed)} node(s), {len(self.cached)} from cache, "
                 f"{len(self.failed)} failed, {len(self.skipped)} skipped"]
        for err in self.failed.values():
            lines.append(f"  - {err}")
        for node_id, cause in self.skipped.items():
            lines.append(f"  - node {node_id} skipped: it depends on failed node {cause}")
        return "\n".join(lines)


class Executor:
    """Runs prompts against one registry, reusing `cache` across runs (a fresh OutputCache
    of this executor if none is given)."""

    def __init__(self, registry: Mapping[str, NodeSpec], cache: OutputCache | None = None, hooks: Any = None,
                 *, keep_outputs: bool = True) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()
        self.hooks = hooks
        self.keep_outputs = keep_outputs

    def run(
        self,
        prompt: Mapping[str, Any],
        context: Any = None,
        outputs: Sequence[str] | None = None,
        *,
        extra_pnginfo: Any = None,
        raise_on_failure: bool = True,
    ) -> RunResult:
        """Validate (raising ValidationError before anything runs), then run the nodes that
        `outputs` (default: every output node) need. Raises ExecutionFailed at the end if
        a node failed, unless `raise_on_failure` is False."""
        prompt = as_prompt(prompt)
        wanted = None if outputs is None else [str(o) for o in outputs]
        result = RunResult(warnings=check(prompt, self.registry, context, wanted))
        targets, _ = select_outputs(prompt, self.registry, wanted)
        deps = dependencies(prompt, self.registry)
        order = run_order(deps, targets)
        run = _Run(self, prompt, context, extra_pnginfo, result, _consumers(deps, order),
                   None if self.keep_outputs else set(targets))
        _call(self.hooks, "on_run_start", list(order))
        for node_id in order:
            blocker = next((d for d in deps[node_id] if d in result.failed or d in result.skipped), None)
            if blocker is not None:
                result.skipped[node_id] = result.skipped.get(blocker, blocker)
            else:
                run.node(node_id)
            run.release(deps[node_id])
        if result.failed and raise_on_failure:
            raise ExecutionFailed(result) from next(iter(result.failed.values()))
        return result


def _consumers(deps: Deps, order: Sequence[str]) -> dict[str, int]:
    """How many nodes of `order` read each node's outputs."""
    count: dict[str, int] = {}
    for node_id in order:
        for dep in deps[node_id]:
            count[dep] = count.get(dep, 0) + 1
    return count


class _Run:
    """The state of one run: signatures so far, the outputs still to be read (with how many
    readers are left), and the lazily built API prompt. `keep`: the node ids whose values go
    into `RunResult.outputs` (None: all)."""

    def __init__(self, ex: Executor, prompt: Prompt, context: Any, extra_pnginfo: Any, result: RunResult,
                 readers: dict[str, int], keep: set[str] | None) -> None:
        self.ex, self.prompt, self.context, self.extra_pnginfo, self.result = ex, prompt, context, extra_pnginfo, result
        self.signatures: dict[str, str | None] = {}
        self.live: dict[str, tuple[Any, ...]] = {}
        self.readers, self.keep = readers, keep
        self._api: dict[str, Any] | None = None

    def release(self, read: Sequence[str]) -> None:
        """One reader of each node in `read` is done; outputs nobody will read again are dropped."""
        for dep in read:
            self.readers[dep] -= 1
            if self.readers[dep] == 0:
                self.live.pop(dep, None)

    def node(self, node_id: str) -> None:
        node = self.prompt[node_id]
        spec = self.ex.registry[node.class_type]
        hooks, result = self.ex.hooks, self.result
        _call(hooks, "on_node_start", node_id, node.class_type)
        try:
            literals, linked, upstream = self._inputs(node, spec)
            sig = self._signature(node_id, node, spec, literals, upstream)
            self.signatures[node_id] = sig
            hit = self.ex.cache.get(sig) if sig is not None else None
            if hit is None:
                start = time.perf_counter()
                raw = spec.run(self.context, **literals, **linked, **self._hidden(node_id, node, spec))
                produced = _normalise(spec, raw)
                result.seconds[node_id] = time.perf_counter() - start
                if sig is not None:
                    self.ex.cache.put(sig, produced)
        except Exception as exc:
            err = NodeExecutionError(node_id, node.class_type, f"{type(exc).__name__}: {exc}", node.title)
            err.__cause__ = exc
            result.failed[node_id] = err
            _call(hooks, "on_node_error", node_id, node.class_type, err)
            return
        out = hit if hit is not None else produced
        if self.readers.get(node_id):
            self.live[node_id] = out.values
        if self.keep is None or node_id in self.keep:
            result.outputs[node_id] = out.values
        if out.ui is not None:
            result.ui[node_id] = out.ui
        (result.cached if hit is not None else result.executed).append(node_id)
        _call(hooks, "on_node_done", node_id, node.class_type, hit is not None)

    def _inputs(self, node: PromptNode, spec: NodeSpec) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[str | None, int]]]:
        literals: dict[str, Any] = {}
        linked: dict[str, Any] = {}
        upstream: dict[str, tuple[str | None, int]] = {}
        for name, value in node.inputs.items():
            inp = spec.input(name)
            if inp is None:
                continue  # extra inputs are ignored (a validation warning)
            if isinstance(value, Link):
                linked[name] = self.live[value.node_id][value.slot]
                upstream[name] = (self.signatures[value.node_id], value.slot)
            else:
                literals[name] = coerce(inp, value)
        return literals, linked, upstream

    def _signature(self, node_id: str, node: PromptNode, spec: NodeSpec, literals: dict[str, Any],
                   upstream: dict[str, tuple[str | None, int]]) -> str | None:
        if any(sig is None for sig, _ in upstream.values()):
            return None  # an upstream node always re-runs, so this one must too
        changed: Any = None
        if spec.is_changed is not None:
            try:
                changed = spec.is_changed(self.context, **literals)
            except Exception:  # as ComfyUI: treat as changed; the run itself reports the real error
                changed = NeverCache()
        uid = node_id if "unique_id" in spec.hidden else None
        return signature(node.class_type, spec.version, literals, upstream, changed, uid)  # type: ignore[arg-type]

    def _hidden(self, node_id: str, node: PromptNode, spec: NodeSpec) -> dict[str, Any]:
        hidden: dict[str, Any] = {}
        for name in spec.hidden:
            if name == "prompt":
                if self._api is None:
                    self._api = to_api(self.prompt)
                hidden[name] = self._api
            elif name == "unique_id":
                hidden[name] = node_id
            elif name == "extra_pnginfo":
                hidden[name] = self.extra_pnginfo
            elif name == "progress":
                hidden[name] = NodeProgress(self.ex.hooks, node_id, node.class_type)
            else:
                hidden[name] = None
        return hidden


def _normalise(spec: NodeSpec, raw: Any) -> NodeOutputs:
    """A node's return value as NodeOutputs; a wrong shape is the node's bug, reported as such."""
    ui = None
    if isinstance(raw, Mapping) and ("result" in raw or "ui" in raw):
        ui, raw = raw.get("ui"), raw.get("result", ())
    n = len(spec.outputs)
    if n == 0:
        return NodeOutputs((), ui)
    if not isinstance(raw, (tuple, list)) or len(raw) != n:
        got = f"a {type(raw).__name__}" if not isinstance(raw, (tuple, list)) else f"{len(raw)} value(s)"
        raise TypeError(f"the node returned {got}; its spec declares {n} output(s), so it must return a tuple of {n}")
    return NodeOutputs(tuple(raw), ui)


def _call(hooks: Any, name: str, *args: Any) -> None:
    method = getattr(hooks, name, None) if hooks is not None else None
    if method is not None:
        method(*args)
