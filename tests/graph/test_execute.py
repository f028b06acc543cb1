"""Execution: dependency order, only needed nodes, signature caching across runs,
is_changed, failure isolation, hooks and progress."""
from __future__ import annotations

import math
import sys
import weakref
from collections import Counter

import pytest
from graph_toys import toy_registry

from ldm_core.graph import (
    ExecutionFailed,
    Executor,
    Hooks,
    NodeExecutionError,
    NodeOutputs,
    OutputCache,
    ValidationError,
    parse_api,
)
from ldm_core.graph.spec import INT, InputSpec, NodeSpec, OutputSpec

TXT2IMG = {
    "1": {"class_type": "Loader", "inputs": {"ckpt_name": "tiny.ckpt"}},
    "2": {"class_type": "Encode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
    "3": {"class_type": "Encode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    "4": {"class_type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {"class_type": "Sampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0],
        "seed": 1, "steps": 4, "cfg": 7.0, "sampler_name": "euler"}},
    "6": {"class_type": "Decode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "Save", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
}


class Recorder(Hooks):
    def __init__(self):
        self.events: list[tuple] = []

    def on_node_start(self, node_id, class_type):
        self.events.append(("start", node_id))

    def on_node_done(self, node_id, class_type, cached):
        self.events.append(("done", node_id, cached))

    def on_node_error(self, node_id, class_type, error):
        self.events.append(("error", node_id))

    def on_progress(self, node_id, class_type, done, total, preview=None):
        self.events.append(("progress", node_id, done, total))


def changed(**inputs) -> dict:
    """TXT2IMG with inputs changed: changed(n5={"steps": 8})."""
    prompt = parse_api(TXT2IMG)
    for key, values in inputs.items():
        prompt[key.lstrip("n")].inputs.update(values)
    return prompt


@pytest.fixture
def calls() -> Counter:
    return Counter()


@pytest.fixture
def executor(calls) -> Executor:
    return Executor(toy_registry(calls), OutputCache(), Recorder())


def test_runs_in_dependency_order(executor):
    result = executor.run(parse_api(TXT2IMG))
    starts = [e[1] for e in executor.hooks.events if e[0] == "start"]
    assert sorted(starts) == sorted(TXT2IMG) and starts == result.executed
    position = {node_id: k for k, node_id in enumerate(starts)}
    for node_id, node in TXT2IMG.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert position[value[0]] < position[node_id]
    assert result.ok and result.ui["7"]["images"][0].startswith("x:image(sampled(model[tiny.ckpt],cond(clip[tiny.ckpt],a cat)")
    assert result.outputs["4"] == ("latent(64x64x1)",)


def test_only_needed_nodes_run(executor, calls):
    prompt = {**parse_api(TXT2IMG), **parse_api({"20": {"class_type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 2}}})}
    result = executor.run(prompt)
    assert "20" not in result.executed and calls["EmptyLatent"] == 1
    partial = Executor(toy_registry(calls)).run(parse_api(TXT2IMG), outputs=["5"])
    assert set(partial.executed) == {"1", "2", "3", "4", "5"}


def test_unchanged_rerun_executes_nothing(executor, calls):
    executor.run(parse_api(TXT2IMG))
    before = sum(calls.values())
    executor.cache.reset_stats()
    result = executor.run(parse_api(TXT2IMG))
    assert sum(calls.values()) == before and result.executed == []
    assert sorted(result.cached) == sorted(TXT2IMG) and executor.cache.hits == 7 and executor.cache.misses == 0
    assert result.ui["7"] and all(e[2] for e in executor.hooks.events[-14:] if e[0] == "done")


@pytest.mark.parametrize("edit, recomputed", [
    ({"n2": {"text": "a dog"}}, {"2", "5", "6", "7"}),
    ({"n5": {"seed": 2}}, {"5", "6", "7"}),
    ({"n7": {"filename_prefix": "y"}}, {"7"}),
    ({"n4": {"width": 128}}, {"4", "5", "6", "7"}),
    ({"n1": {"ckpt_name": "sd15.safetensors"}}, {"1", "2", "3", "5", "6", "7"}),
])
def test_changing_one_widget_recomputes_exactly_its_descendants(executor, calls, edit, recomputed):
    executor.run(parse_api(TXT2IMG))
    calls.clear()
    result = executor.run(changed(**edit))
    assert set(result.executed) == recomputed
    assert sum(calls.values()) == len(recomputed)
    assert set(result.cached) == set(TXT2IMG) - recomputed


def test_cache_is_shared_through_the_caller(calls):
    cache = OutputCache()
    Executor(toy_registry(calls), cache).run(parse_api(TXT2IMG))
    calls.clear()
    assert Executor(toy_registry(calls), cache).run(parse_api(TXT2IMG)).executed == [] and not calls
    bounded = OutputCache(max_entries=3)
    Executor(toy_registry(calls), bounded).run(parse_api(TXT2IMG))
    assert len(bounded) == 3


def test_integral_float_hits_the_same_entry(executor):
    executor.run(parse_api(TXT2IMG))
    assert executor.run(changed(n5={"steps": 4.0})).executed == []


def counting_spec(calls: Counter, is_changed=None, version=1) -> NodeSpec:
    def run(ctx, path):
        calls["Read"] += 1
        return {"ui": {"read": path}, "result": (ctx["files"][path],)}

    return NodeSpec("Read", "Read", "t", run, (InputSpec("path", "STRING"),), (OutputSpec(INT),),
                    output_node=True, is_changed=is_changed, version=version)


def test_is_changed_forces_a_rerun(calls):
    reg = {"Read": counting_spec(calls, is_changed=lambda ctx, path: ctx["mtime"][path])}
    ex = Executor(reg)
    prompt = parse_api({"1": {"class_type": "Read", "inputs": {"path": "a"}}})
    ctx = {"files": {"a": 1}, "mtime": {"a": 100}}
    ex.run(prompt, ctx)
    ex.run(prompt, ctx)
    assert calls["Read"] == 1
    ctx = {"files": {"a": 2}, "mtime": {"a": 101}}
    assert ex.run(prompt, ctx).outputs["1"] == (2,) and calls["Read"] == 2


def test_is_changed_nan_or_raising_means_always_rerun(calls):
    for is_changed in (lambda ctx, path: math.nan, lambda ctx, path: 1 / 0):
        calls.clear()
        ex = Executor({"Read": counting_spec(calls, is_changed=is_changed)})
        prompt = parse_api({"1": {"class_type": "Read", "inputs": {"path": "a"}}})
        ex.run(prompt, {"files": {"a": 1}})
        ex.run(prompt, {"files": {"a": 1}})
        assert calls["Read"] == 2


def test_version_is_part_of_the_key(calls):
    cache = OutputCache()
    prompt = parse_api({"1": {"class_type": "Read", "inputs": {"path": "a"}}})
    Executor({"Read": counting_spec(calls)}, cache).run(prompt, {"files": {"a": 1}})
    Executor({"Read": counting_spec(calls, version=2)}, cache).run(prompt, {"files": {"a": 1}})
    assert calls["Read"] == 2


BRANCHES = {
    "1": {"class_type": "Const", "inputs": {"value": 3}},
    "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
    "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
    "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    "5": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
    "6": {"class_type": "Show", "inputs": {"value": ["5", 0]}},
}


def test_failure_is_isolated_and_wraps_the_cause(executor):
    with pytest.raises(ExecutionFailed) as info:
        executor.run(parse_api(BRANCHES))
    result = info.value.result
    assert set(result.failed) == {"2"} and result.skipped == {"3": "2", "4": "2"}
    assert result.ui["6"] == {"value": 13} and "6" in result.executed
    err = result.failed["2"]
    assert isinstance(err, NodeExecutionError) and (err.node_id, err.class_type) == ("2", "Fail")
    assert isinstance(err.__cause__, ValueError) and err.original is err.__cause__
    assert "node 2 (Fail) failed: ValueError: toy failure on 3" in str(info.value)
    assert "node 4 skipped: it depends on failed node 2" in str(info.value)
    assert info.value.__cause__ is err and ("error", "2") in executor.hooks.events


def test_failure_can_be_returned_instead(executor, calls):
    result = executor.run(parse_api(BRANCHES), raise_on_failure=False)
    assert not result.ok and list(result.failed) == ["2"]
    again = executor.run(parse_api(BRANCHES), raise_on_failure=False)  # failures are not cached
    assert calls["Fail"] == 2 and set(again.cached) == {"1", "5", "6"} and again.executed == []


def test_validation_happens_before_anything_runs(executor, calls):
    with pytest.raises(ValidationError):
        executor.run(changed(n5={"steps": 0}))
    assert not calls and not executor.hooks.events


def test_bad_return_shape_is_reported_as_the_nodes_error():
    reg = {"Bad": NodeSpec("Bad", "Bad", "t", lambda ctx: 5, (), (OutputSpec(INT),)),
           "Show": toy_registry()["Show"]}
    prompt = parse_api({"1": {"class_type": "Bad"}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
    result = Executor(reg).run(prompt, raise_on_failure=False)
    assert isinstance(result.failed["1"].__cause__, TypeError) and "tuple of 1" in str(result.failed["1"])


def test_hidden_inputs_and_progress():
    seen = {}

    def run(ctx, steps, progress, unique_id, prompt, extra_pnginfo):
        progress.start(steps)
        for k in range(steps):
            progress.update(k + 1, steps)
        seen.update(uid=unique_id, prompt=prompt, png=extra_pnginfo)
        return {"ui": {"ok": True}}

    spec = NodeSpec("Steps", "Steps", "t", run, (InputSpec("steps", INT, 2),), output_node=True,
                    hidden=("progress", "unique_id", "prompt", "extra_pnginfo"))
    hooks = Recorder()
    api = {"9": {"class_type": "Steps", "inputs": {"steps": 2}}}
    Executor({"Steps": spec}, hooks=hooks).run(parse_api(api), extra_pnginfo={"workflow": 1})
    assert [e for e in hooks.events if e[0] == "progress"] == [("progress", "9", 0, 2), ("progress", "9", 1, 2), ("progress", "9", 2, 2)]
    assert seen == {"uid": "9", "prompt": api, "png": {"workflow": 1}}


def test_unknown_inputs_are_dropped(executor):
    result = executor.run(changed(n5={"scheduler": "karras"}))
    assert result.ok and [w.code for w in result.warnings] == ["unknown_input"]


def test_long_chain_needs_no_recursion(calls):
    n = sys.getrecursionlimit() + 500
    api = {"0": {"class_type": "Const", "inputs": {"value": 0}}}
    api.update({str(k): {"class_type": "Add", "inputs": {"a": [str(k - 1), 0], "b": 1}} for k in range(1, n)})
    api["end"] = {"class_type": "Show", "inputs": {"value": [str(n - 1), 0]}}
    assert Executor(toy_registry(calls)).run(parse_api(api)).ui["end"] == {"value": n - 1}


# --- memory: outputs released after their last reader, a cache bounded in bytes -----------

class Blob:
    """A weak-referenceable stand-in for a model or tensor."""

    def __init__(self, size: int) -> None:
        self.size = size


def _chain_registry(made: dict, seen: dict) -> dict:
    """Make → Use → Use2 → Done (output): Make's blob is read by Use only."""
    def make(ctx, size):
        made["blob"] = Blob(size)
        return (made["blob"],)

    def use(ctx, blob):
        return (blob.size,)

    def use2(ctx, value):
        seen["alive_after_use"] = made["ref"]() is not None if "ref" in made else None
        return (value + 1,)

    def done(ctx, value):
        return {"ui": {"value": [value]}}

    return {
        "Make": NodeSpec("Make", "Make", "t", make, (InputSpec("size", INT, 1, 0, 10**12),), (OutputSpec("BLOB"),)),
        "Use": NodeSpec("Use", "Use", "t", use, (InputSpec("blob", "BLOB"),), (OutputSpec(INT),)),
        "Use2": NodeSpec("Use2", "Use2", "t", use2, (InputSpec("value", INT),), (OutputSpec(INT),)),
        "Done": NodeSpec("Done", "Done", "t", done, (InputSpec("value", INT),), (), output_node=True),
    }


CHAIN = {"1": {"class_type": "Make", "inputs": {"size": 7}}, "2": {"class_type": "Use", "inputs": {"blob": ["1", 0]}},
         "3": {"class_type": "Use2", "inputs": {"value": ["2", 0]}}, "4": {"class_type": "Done", "inputs": {"value": ["3", 0]}}}


class WeakRefOnDone(Hooks):
    def __init__(self, made: dict) -> None:
        self.made = made

    def on_node_done(self, node_id, class_type, cached):
        if class_type == "Make":
            self.made["ref"] = weakref.ref(self.made.pop("blob"))


def test_an_output_is_released_once_its_last_reader_ran():
    made, seen = {}, {}
    nothing_kept = OutputCache(max_bytes=0, sizeof=lambda values: 1)
    ex = Executor(_chain_registry(made, seen), nothing_kept, WeakRefOnDone(made), keep_outputs=False)
    result = ex.run(parse_api(CHAIN))
    assert result.ui["4"] == {"value": [8]}
    assert seen["alive_after_use"] is False  # freed before Use2 ran: only Use read it
    assert set(result.outputs) == {"4"}  # only the requested output node's values are returned


def test_keep_outputs_and_an_unbounded_cache_keep_it_alive():
    made, seen = {}, {}
    ex = Executor(_chain_registry(made, seen), OutputCache(), WeakRefOnDone(made))
    result = ex.run(parse_api(CHAIN))
    assert seen["alive_after_use"] is True and set(result.outputs) == {"1", "2", "3", "4"}


def test_the_cache_drops_least_recently_used_entries_past_its_byte_budget():
    cache = OutputCache(max_bytes=10, sizeof=lambda values: values[0].size)
    for name, size in (("a", 4), ("b", 4), ("c", 4)):
        cache.put(name, NodeOutputs((Blob(size),)))
    assert "a" not in cache and "b" in cache and "c" in cache and cache.nbytes == 8 and cache.evicted == 1
    cache.get("b")  # b is now the most recent
    cache.put("d", NodeOutputs((Blob(4),)))
    assert "c" not in cache and "b" in cache and "d" in cache
    cache.put("huge", NodeOutputs((Blob(11),)))  # larger than the budget on its own: not kept
    assert "huge" not in cache and cache.nbytes <= 10
    with pytest.raises(ValueError, match="sizeof"):
        OutputCache(max_bytes=10)
