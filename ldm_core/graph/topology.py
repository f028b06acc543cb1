"""The shape of a prompt as a graph: who depends on whom, what an output needs, in what
order to run it, and where it loops. Iterative throughout, so a long chain cannot hit
Python's recursion limit.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from ldm_core.graph.prompt_graph import Link, PromptNode
from ldm_core.graph.spec import NodeSpec

Deps = dict[str, list[str]]


def node_links(node: PromptNode, spec: NodeSpec | None) -> list[tuple[str, Link]]:
    """(input name, link) of the inputs that matter: those the node type declares (extra
    inputs are ignored, as ComfyUI does), or every link when the type is unknown."""
    return [
        (name, value)
        for name, value in node.inputs.items()
        if isinstance(value, Link) and (spec is None or spec.input(name) is not None)
    ]


def dependencies(prompt: Mapping[str, PromptNode], registry: Mapping[str, NodeSpec]) -> Deps:
    """node id -> ids of the existing nodes it reads from, in input order, without repeats."""
    deps: Deps = {}
    for node_id, node in prompt.items():
        seen: dict[str, None] = {}
        for _, link in node_links(node, registry.get(node.class_type)):
            if link.node_id in prompt:
                seen[link.node_id] = None
        deps[node_id] = list(seen)
    return deps


def needed(deps: Deps, roots: Iterable[str]) -> set[str]:
    """The roots and everything upstream of them."""
    out: set[str] = set()
    stack = [r for r in roots if r in deps]
    while stack:
        node_id = stack.pop()
        if node_id not in out:
            out.add(node_id)
            stack.extend(deps[node_id])
    return out


def run_order(deps: Deps, roots: Iterable[str]) -> list[str]:
    """Every node the roots need, each after all its dependencies (depth-first post-order
    from the roots in the order given: deterministic). The graph must be acyclic."""
    order: list[str] = []
    done: set[str] = set()
    for root in roots:
        if root in done or root not in deps:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        on_stack = {root}
        while stack:
            node_id, i = stack[-1]
            children = deps[node_id]
            if i < len(children):
                stack[-1] = (node_id, i + 1)
                child = children[i]
                if child not in done and child not in on_stack:
                    stack.append((child, 0))
                    on_stack.add(child)
            else:
                stack.pop()
                on_stack.discard(node_id)
                done.add(node_id)
                order.append(node_id)
    return order


def cycles(deps: Deps) -> list[list[str]]:
    """Each set of nodes that depend on each other (strongly connected components with a
    loop, self-links included), via Tarjan's algorithm without recursion."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in deps:
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node_id, i = work[-1]
            if i == 0:
                index[node_id] = low[node_id] = counter
                counter += 1
                stack.append(node_id)
                on_stack.add(node_id)
            children = deps[node_id]
            if i < len(children):
                work[-1] = (node_id, i + 1)
                child = children[i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node_id] = min(low[node_id], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node_id])
            if low[node_id] == index[node_id]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node_id:
                        break
                if len(component) > 1 or node_id in deps[node_id]:
                    found.append(component)
    return found
