"""`ldm-run WORKFLOW`: run a saved graph (API or UI JSON, or a PNG that carries one) headless.

Arguments are parsed before torch and the node modules are imported, so `--help` and a wrong
flag answer at once.
"""
from __future__ import annotations

import argparse
import difflib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ldm_core import graph

from .context import NodeContext, PathError

SEED_INPUTS = ("seed", "noise_seed")
WEIGHT_DTYPES = ("auto", "fp32", "fp16", "bf16")  # = ldm_core.device.WEIGHT_DTYPES (a test keeps them equal)


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # not JSON, or an integer past Python's digit limit: the text itself (validation says why)
        return text


def apply_sets(prompt: dict, sets: list[str], registry: dict | None = None) -> None:
    """`NODE.INPUT=VALUE` overrides (VALUE parsed as JSON when it parses, else a string). With the
    `registry`, an input the node type does not have is an error that suggests the closest name."""
    for item in sets:
        target, sep, value = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot:
            raise SystemExit(f"ldm-run: --set {item!r}: expected NODE.INPUT=VALUE")
        if node_id not in prompt:
            raise SystemExit(f"ldm-run: --set {item!r}: no node {node_id!r} (nodes: {', '.join(sorted(prompt))})")
        spec = (registry or {}).get(prompt[node_id].class_type)
        if spec is not None and spec.input(name) is None:
            names = [i.name for i in spec.inputs]
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SystemExit(f"ldm-run: --set {item!r}: node {node_id} ({prompt[node_id].class_type}) has no input "
                             f"{name!r}; {hint}its inputs: {', '.join(names)}")
        prompt[node_id].inputs[name] = _literal(value)


def set_seeds(prompt: dict, seed: int | None, offset: int = 0) -> int:
    """Give every literal seed input the value `seed` + `offset` (`seed` None: its own value +
    `offset`, so `--batch-seeds N` alone walks on from the graph's seeds); returns how many."""
    n = 0
    for node in prompt.values():
        for name in SEED_INPUTS:
            value = node.inputs.get(name)
            if name in node.inputs and not isinstance(value, graph.Link):
                base = seed if seed is not None else (value if isinstance(value, int) else 0)
                node.inputs[name] = base + offset
                n += 1
    return n


class BarHooks:
    """Progress on stderr: which node of how many, time so far, and a bar per node's steps."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.total, self.done, self.start = 0, 0, time.perf_counter()

    def on_run_start(self, node_ids: list[str]) -> None:
        self.total, self.done, self.start = len(node_ids), 0, time.perf_counter()

    def on_node_start(self, node_id: str, class_type: str) -> None:
        self.done += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{node_id}] {class_type}  (node {self.done} of {self.total}, {elapsed:.1f} s so far)",
                  file=sys.stderr)

    def on_progress(self, node_id: str, class_type: str, done: int, total: int, preview: Any = None) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"  {class_type}", leave=False)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.bar.close()
            self.bar = None


def _ui_workflow(path: str) -> dict | None:
    """The editor-format JSON to embed in saved PNGs, when the input is one."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        return None
    try:
        data = json.loads(p.read_bytes())  # bytes: UTF-16/32 files too; a PNG renamed .json is not JSON
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and "nodes" in data and "links" in data else None


def _ram_budget(text: str) -> int | None:
    """Bytes the output cache may keep: an explicit size, or half the RAM available now (None if unknown)."""
    from ldm_core.device import available_ram
    from ldm_core.loading.footprint import parse_bytes

    if text != "auto":
        return parse_bytes(text)
    free = available_ram()
    return None if free is None else free // 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-run", description=__doc__)
    p.add_argument("workflow", help="workflow .json (API or editor format) or a .png that carries one")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input")
    p.add_argument("--models-dir", help="ComfyUI-style models folder (checkpoints/, vae/, loras/, embeddings/ ...)")
    p.add_argument("--extra-model-paths", help="an extra_model_paths.yaml")
    p.add_argument("--input-dir", default="input")
    p.add_argument("--output-dir", default="output")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"])
    p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="auto",
                   help="how loaders keep weights in memory: auto = as in the file (an fp16 file stays fp16, "
                        "computed in fp32 on the CPU), or fp32 / fp16 / bf16")
    p.add_argument("--ram-budget", default="auto", metavar="SIZE",
                   help="most bytes of node outputs (models included) kept for later nodes and runs, e.g. 8G; "
                        "auto = half the RAM available at start; outputs no later node needs are freed regardless")
    p.add_argument("--seed", type=int, help="set every seed input to this value")
    p.add_argument("--batch-seeds", type=int, default=1, metavar="N", help="run N times, seeds seed..seed+N-1")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary on stdout")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    try:
        budget = _ram_budget(args.ram_budget)
    except ValueError as e:
        p.error(f"--ram-budget: {e}")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args, budget)
    except KeyboardInterrupt:
        print("ldm-run: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("ldm-run: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised where the run is so that every `finally` runs (no half-written file stays)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _run(args: argparse.Namespace, budget: int | None) -> int:
    from ldm_core.loading import footprint

    from .registry import headless_registry

    try:
        ctx = NodeContext.headless(args.models_dir, input_dir=args.input_dir, output_dir=args.output_dir,
                                   extra_paths=args.extra_model_paths, device=args.device,
                                   weight_dtype=None if args.weight_dtype == "auto" else args.weight_dtype)
    except PathError as e:
        print(f"ldm-run: --extra-model-paths: {e}", file=sys.stderr)
        return 2
    registry = headless_registry()
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"ok": False, "images": [], "runs": 0}
    try:
        base = graph.load_workflow(args.workflow, registry)
        ui = _ui_workflow(args.workflow)
        cache = graph.OutputCache(max_bytes=budget, sizeof=footprint.nbytes)
        executor = graph.Executor(registry, cache, BarHooks(args.quiet or args.json), keep_outputs=False)
        for k in range(max(1, args.batch_seeds)):
            prompt = {nid: graph.PromptNode(n.class_type, dict(n.inputs), n.title) for nid, n in base.items()}
            apply_sets(prompt, args.set, registry)
            if args.seed is not None or k:
                set_seeds(prompt, args.seed, k)
            if k == 0:  # before anything runs (the run checks again, without printing)
                for warning in graph.check(prompt, registry, ctx):
                    print(f"ldm-run: warning: {warning}", file=sys.stderr)
            result = executor.run(prompt, ctx, extra_pnginfo={"workflow": ui} if ui else None)
            for ui_out in result.ui.values():
                for img in ui_out.get("images", []):
                    summary["images"].append(str(Path(args.output_dir) / img["subfolder"] / img["filename"])
                                             if img.get("type") == "output" else img["filename"])
            summary["runs"] += 1
        summary["ok"] = True
    except (graph.ValidationError, graph.WorkflowError, graph.ExecutionFailed) as e:
        summary["error"] = str(e)
        print(f"ldm-run: {e}", file=sys.stderr)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["peak_rss_gib"] = round(footprint.peak_rss() / 2**30, 3)
    if args.json:
        print(json.dumps(summary))
    elif summary["ok"]:
        for path in summary["images"]:
            print(path)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
