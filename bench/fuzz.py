"""Mutated workflows through load → validate (and a sample through execution): what comes out?

`python -m bench.fuzz [--count 10000] [--run 40] [--seed 0] [--timeout 20]`

Each case takes one of the shipped `workflows/*.json` (API and editor formats) and applies 1–4
random mutations: a value replaced by another type or an extreme (huge, negative, NaN, deep
nesting, a long string), an input or node deleted, a link re-pointed to another node or slot,
a class type swapped, keys added, the JSON text truncated or byte-flipped. It is then loaded and
validated against the real headless registry (`ldm_nodes.registry.headless_registry`), as
`ldm-run` does before any model is loaded. Of the cases that validate, `--run` are executed with
every size shrunk to 64 and steps to 1 on the embedded model. The table counts: typed errors
(WorkflowError, ValidationError; ExecutionFailed for runs), valid cases, unexpected exceptions
(anything else: a bug) and hangs (a case over `--timeout` seconds). Target: 0 unexpected, 0 hangs.
The first few unexpected exceptions are printed with their case so they can be replayed.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
EXTREMES: list[Any] = [None, True, -1, 0, 2**63, -(2**70), 10**400 // 10**300, 1e308, float("nan"), float("inf"), "",
                       "x" * 10_000, "../../etc/passwd", "(red:nan)", "embedding:../../x", [], {}, [[[[[]]]]],
                       {"a": {"b": {"c": None}}}, ["1", 0], ["999", 0], ["1", 99], ["1", -1], 3.5, "euler", "\x00"]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def _values(obj: Any) -> list[tuple]:
    """Paths to every value inside a JSON structure (iteratively: mutated cases nest deeply)."""
    out, stack = [], [((), obj)]
    while stack:
        path, value = stack.pop()
        out.append(path)
        if isinstance(value, dict):
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
    return out


def _get_parent(obj: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        obj = obj[key]
    return obj, path[-1]


def mutate(obj: Any, rng: random.Random) -> Any:
    """One random structural or value mutation of a parsed workflow (in place where possible)."""
    paths = [p for p in _values(obj) if p]
    if not paths:
        return copy.deepcopy(rng.choice(EXTREMES))
    parent, key = _get_parent(obj, rng.choice(paths))
    kind = rng.randrange(6)
    if kind == 0:
        parent[key] = copy.deepcopy(rng.choice(EXTREMES))
    elif kind == 1 and isinstance(parent, dict):
        del parent[key]
    elif kind == 1 and isinstance(parent, list) and parent:
        parent.pop(key)
    elif kind == 2:  # re-point a link-like value
        parent[key] = [str(rng.randrange(0, 20)), rng.randrange(-1, 4)]
    elif kind == 3 and isinstance(parent, dict):
        parent[rng.choice(["class_type", "inputs", "nodes", "links", "widgets_values", "mode", "type", "zz"])] = \
            copy.deepcopy(rng.choice(EXTREMES + ["KSampler", "Reroute", "PrimitiveNode", "LDMSaveImage"]))
    elif kind == 4 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * rng.choice([-1, 10**6, 0.5]) if parent[key] == parent[key] else 0
    else:
        parent[key] = copy.deepcopy(obj if rng.random() < 0.05 else rng.choice(EXTREMES))  # self-nesting, rarely
    return obj


def case_text(base: dict, rng: random.Random) -> str | bytes:
    obj = copy.deepcopy(base)
    for _ in range(rng.randint(1, 4)):
        obj = mutate(obj, rng)
    text = json.dumps(obj, allow_nan=True)
    roll = rng.random()
    if roll < 0.05:
        return text[: rng.randrange(len(text) + 1)]  # truncated
    if roll < 0.1:
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = rng.randrange(256)  # a flipped byte
        return bytes(raw)
    return text


def _shrunk(prompt: dict) -> dict:
    """Sizes to 64, steps to 1, tiles to their minimum: runs in seconds on the CPU."""
    small = {"width": 64, "height": 64, "steps": 1, "batch_size": 1, "tile_size": 64, "tile_overlap": 16}
    for node in prompt.values():
        for name in list(node.inputs):
            if name in small and isinstance(node.inputs[name], int) and not isinstance(node.inputs[name], bool):
                node.inputs[name] = min(node.inputs[name], small[name])
    return prompt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--run", type=int, default=40, help="how many valid cases to execute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=20, help="seconds before a case counts as a hang")
    args = p.parse_args(argv)

    from ldm_core import graph
    from ldm_nodes.context import NodeContext
    from ldm_nodes.registry import headless_registry

    registry = headless_registry()
    bases = {w.name: json.loads(w.read_text()) for w in sorted(WORKFLOWS.glob("*.json"))}
    rng = random.Random(args.seed)
    counts: Counter = Counter()
    shown = 0
    valid: list[tuple[str, Any]] = []
    out = Path(tempfile.mkdtemp(prefix="ldm-fuzz-"))
    ctx = NodeContext.headless(input_dir=out / "input", output_dir=out / "output")
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    for i in range(args.count):
        name = rng.choice(list(bases))
        try:
            text = case_text(bases[name], rng)
        except RecursionError:  # json.dumps of a case nested past Python's limit: not a case to load
            counts["not generated"] += 1
            continue
        signal.alarm(args.timeout)
        try:
            prompt = graph.load_workflow(text, registry)
            graph.check(prompt, registry, ctx)
            counts["valid"] += 1
            if len(valid) < args.run:
                valid.append((name, prompt))
        except (graph.WorkflowError, graph.ValidationError):
            counts["typed error"] += 1
        except Hang:
            counts["hang"] += 1
        except Exception:  # noqa: BLE001 - exactly what this bench looks for
            counts["unexpected"] += 1
            if shown < 5:
                shown += 1
                print(f"--- unexpected, case {i} from {name}:\n{traceback.format_exc(limit=4)}{str(text)[:300]}",
                      file=sys.stderr)
        finally:
            signal.alarm(0)
    checked = time.perf_counter() - t0
    executor = graph.Executor(registry, graph.OutputCache(max_entries=8))
    run_counts: Counter = Counter()
    t1 = time.perf_counter()
    for name, prompt in valid:
        signal.alarm(args.timeout * 6)
        try:
            executor.run(_shrunk(prompt), ctx)
            run_counts["ran"] += 1
        except (graph.ExecutionFailed, graph.ValidationError, graph.WorkflowError):
            run_counts["typed error"] += 1
        except Hang:
            run_counts["hang"] += 1
        except Exception:  # noqa: BLE001
            run_counts["unexpected"] += 1
            print(f"--- unexpected in a run of a mutated {name}:\n{traceback.format_exc(limit=4)}", file=sys.stderr)
        finally:
            signal.alarm(0)
    ran = time.perf_counter() - t1
    print("| stage | cases | typed error | valid / ran | unexpected | hangs | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(f"| load + validate | {args.count} | {counts['typed error']} | {counts['valid']} | {counts['unexpected']} "
          f"| {counts['hang']} | {checked:.1f} |")
    print(f"| execute (valid, tiny sizes) | {len(valid)} | {run_counts['typed error']} | {run_counts['ran']} "
          f"| {run_counts['unexpected']} | {run_counts['hang']} | {ran:.1f} |")
    return 0 if not (counts["unexpected"] or counts["hang"] or run_counts["unexpected"] or run_counts["hang"]) else 1


if __name__ == "__main__":
    sys.exit(main())
