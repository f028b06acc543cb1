"""Overhead of the graph runtime itself, with nodes that do no work.

`python -m bench.graph_overhead [--quick]` builds a 200-node synthetic graph (8 chains of
20, fan-in sums, a chain of mixing nodes, 4 outputs; every widget type used), then times:
validation, scheduling, a fully cached re-run (validate + schedule + signature + cache
lookup for every node), a re-run after one widget changed, and the first run. Prints a
markdown table with targets and verdicts; `run()` returns the rows for the main bench.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from ldm_core.graph import Executor, OutputCache, PromptNode, validate
from ldm_core.graph.prompt_graph import Link, Prompt
from ldm_core.graph.spec import COMBO, FLOAT, INT, InputSpec, NodeSpec, OutputSpec
from ldm_core.graph.topology import dependencies, run_order
from ldm_core.graph.validate import select_outputs

N_NODES = 200
PER_NODE_TARGET_S = 5e-3      # validate + schedule + cache lookup, per node
CACHED_RERUN_TARGET_S = 50e-3  # whole unchanged graph, from cache


def registry() -> dict[str, NodeSpec]:
    def spec(name: str, fn: Callable[..., Any], inputs: tuple[InputSpec, ...], outputs=(OutputSpec(INT),), **kw) -> NodeSpec:
        return NodeSpec(name, name, "bench", fn, inputs, outputs, **kw)

    return {s.id: s for s in (
        spec("Src", lambda ctx, value: (value,), (InputSpec("value", INT, 0, -(10**9), 10**9),)),
        spec("Inc", lambda ctx, a, by: (a + by,), (InputSpec("a", INT, force_input=True), InputSpec("by", INT, 1, -100, 100))),
        spec("Sum", lambda ctx, a, b, c=0, d=0, bias=0.0: (a + b + c + d + int(bias),),
             (InputSpec("a", INT, force_input=True), InputSpec("b", INT, force_input=True),
              InputSpec("c", INT, force_input=True, optional=True), InputSpec("d", INT, force_input=True, optional=True),
              InputSpec("bias", FLOAT, 0.0, -1e6, 1e6, optional=True))),
        spec("Out", lambda ctx, value, format: {"ui": {"value": value, "format": format}},
             (InputSpec("value", INT, force_input=True), InputSpec("format", COMBO, choices=("png", "webp"))),
             outputs=(), output_node=True),
    )}


def synthetic_graph(seed: int = 0) -> Prompt:
    """8 sources → 8 chains of 20 increments → fan-in sums; 25 mixing sums over earlier
    nodes in a chain; 4 outputs. Exactly N_NODES nodes, all needed by some output."""
    rng = random.Random(seed)
    prompt: Prompt = {}

    def add(class_type: str, **inputs: Any) -> str:
        node_id = str(len(prompt) + 1)
        prompt[node_id] = PromptNode(class_type, inputs)
        return node_id

    ends, chain0 = [], []
    for k in range(8):
        last = add("Src", value=k)
        for _ in range(20):
            last = add("Inc", a=Link(last, 0), by=rng.randint(-3, 3))
            if k == 0:
                chain0.append(last)
        ends.append(last)
    left = add("Sum", a=Link(ends[0], 0), b=Link(ends[1], 0), c=Link(ends[2], 0), d=Link(ends[3], 0))
    right = add("Sum", a=Link(ends[4], 0), b=Link(ends[5], 0), c=Link(ends[6], 0), d=Link(ends[7], 0), bias=0.5)
    total = add("Sum", a=Link(left, 0), b=Link(right, 0))
    mix = total
    for _ in range(25):
        mix = add("Sum", a=Link(mix, 0), b=Link(rng.choice(list(prompt)), 0))
    add("Out", value=Link(total, 0), format="png")
    add("Out", value=Link(mix, 0), format="webp")
    add("Out", value=Link(ends[0], 0), format="png")
    add("Out", value=Link(chain0[9], 0), format="png")
    assert len(prompt) == N_NODES
    return prompt


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    """Rows {measure, seconds, target_seconds (or None), verdict, notes}; medians of 5 (quick) or 30 runs."""
    repeats = 5 if quick else 30
    reg, prompt = registry(), synthetic_graph()
    n = len(prompt)

    def schedule() -> list[str]:
        targets, _ = select_outputs(prompt, reg, None)
        return run_order(dependencies(prompt, reg), targets)

    t_validate = median_time(lambda: validate(prompt, reg), repeats)
    t_schedule = median_time(schedule, repeats)

    cache = OutputCache()
    ex = Executor(reg, cache)
    start = time.perf_counter()
    first = ex.run(prompt)
    t_first = time.perf_counter() - start
    assert len(first.executed) == n
    t_cached = median_time(lambda: ex.run(prompt), repeats)
    assert ex.run(prompt).executed == []

    edited = dict(prompt)
    flips = iter(range(10**6))

    def rerun_one_changed() -> int:
        edited["1"] = PromptNode("Src", {"value": 1000 + next(flips)})  # a new value each time: never cached
        return len(ex.run(edited).executed)

    t_changed = median_time(rerun_one_changed, repeats)
    recomputed = rerun_one_changed()

    def row(measure: str, seconds: float, target: float | None, notes: str = "") -> dict:
        verdict = "info" if target is None else ("PASS" if seconds <= target else "FAIL")
        return {"measure": measure, "seconds": seconds, "target_seconds": target, "verdict": verdict, "notes": notes}

    return [
        row("validate, per node", t_validate / n, None, f"{n} nodes: {t_validate * 1e3:.2f} ms"),
        row("schedule, per node", t_schedule / n, None, "dependencies + run order"),
        row("validate + schedule + cache lookup, per node", t_cached / n, PER_NODE_TARGET_S,
            "a fully cached run divided by the node count"),
        row(f"fully cached re-run, {n} nodes", t_cached, CACHED_RERUN_TARGET_S, "no node executes"),
        row("re-run, one source widget changed", t_changed, None, f"{recomputed} nodes recomputed"),
        row(f"first run, {n} trivial nodes", t_first, None, "single measurement"),
    ]


def render(rows: list[dict]) -> str:
    def fmt(s: float | None) -> str:
        if s is None:
            return "—"
        return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    lines = ["| measure | median | target | verdict | notes |", "|---|---|---|---|---|"]
    for r in rows:
        target = "—" if r["target_seconds"] is None else f"≤ {fmt(r['target_seconds'])}"
        lines.append(f"| {r['measure']} | {fmt(r['seconds'])} | {target} | {r['verdict']} | {r['notes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.graph_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 timed runs per measure instead of 30")
    rows = run(quick=p.parse_args(argv).quick)
    sys.stdout.write("# graph runtime overhead\n\n" + render(rows) + "\n")
    return 0 if all(r["verdict"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
