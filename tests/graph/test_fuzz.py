"""Whatever is thrown at load → validate → run, only the graph runtime's own errors come out.

Also: ldm_core.graph imports with torch (and numpy) unavailable.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from graph_toys import TXT2IMG_LINKS, png_with_text, toy_registry, txt2img_api, txt2img_ui_nodes, ui_workflow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm_core.graph import ExecutionFailed, Executor, ValidationError, WorkflowError, load_workflow, validate

REG = toy_registry()
EXPECTED = (WorkflowError, ValidationError, ExecutionFailed)
KEYS = ["nodes", "links", "version", "prompt", "class_type", "inputs", "id", "type", "mode", "widgets_values",
        "outputs", "name", "link", "widget", "origin_id", "origin_slot", "target_id", "target_slot", "definitions",
        "subgraphs", "__value__", "_meta", "title", "1", "2", "3"]
TYPES = list(REG) + ["Reroute", "PrimitiveNode", "Note", "INT", "LATENT", "*"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(TYPES + ["fixed", "randomize", "euler", "tiny.ckpt"]), st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner, max_size=6)),
    max_leaves=40,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_validate_run(obj: Any) -> None:
    try:
        prompt = load_workflow(obj, REG)
        validate(prompt, REG)
        Executor(toy_registry(Counter())).run(prompt)
    except EXPECTED:
        pass


@FUZZ
@given(json_values)
def test_arbitrary_json(obj):
    load_validate_run(obj)
    load_validate_run(json.dumps(obj, allow_nan=True))


@FUZZ
@given(st.dictionaries(st.sampled_from(["1", "2", "3", "4"]), st.fixed_dictionaries(
    {"class_type": st.sampled_from(TYPES)},
    optional={"inputs": st.dictionaries(st.sampled_from(["value", "a", "b", "images", "ckpt_name", "seed", "text"]),
                                        st.one_of(scalars, st.tuples(st.sampled_from(["1", "2", "3", "9"]),
                                                                     st.integers(-1, 3)).map(list)))}),
    min_size=1))
def test_arbitrary_api_prompts(api):
    load_validate_run(api)


small_ids = st.integers(1, 5)
ui_slots = st.fixed_dictionaries(
    {"name": st.sampled_from(["model", "clip", "images", "value", "a", "b", "seed", "samples", "", "text"]),
     "type": st.sampled_from(["INT", "LATENT", "IMAGE", "TOY_MODEL", "TOY_CLIP", "*", "STRING"])},
    optional={"link": st.one_of(st.none(), small_ids), "widget": st.fixed_dictionaries({"name": st.sampled_from(["seed", "value", "b"])})})
ui_docs = st.fixed_dictionaries(
    {"nodes": st.lists(st.fixed_dictionaries(
        {"id": small_ids, "type": st.sampled_from(TYPES)},
        optional={"mode": st.sampled_from([0, 0, 2, 4]), "inputs": st.lists(ui_slots, max_size=4),
                  "outputs": st.lists(ui_slots, max_size=3), "widgets_values": st.lists(scalars, max_size=5)}),
        max_size=6, unique_by=lambda n: n["id"]),
     "links": st.lists(st.one_of(
         st.tuples(small_ids, small_ids, st.integers(0, 3), small_ids, st.integers(0, 3), st.just("*")).map(list),
         st.builds(dict, id=small_ids, origin_id=small_ids, origin_slot=st.integers(0, 3), target_id=small_ids,
                   target_slot=st.integers(0, 3), type=st.just("INT"))), max_size=6)},
    optional={"version": st.sampled_from([0.4, 1])})


@FUZZ
@given(ui_docs)
def test_arbitrary_ui_workflows(doc):
    load_validate_run(doc)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            found += paths(value, prefix + (k,))
    return found


def mutate(doc: Any, data: st.DataObject) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths(doc)[1:]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate", "nudge"]))
        if action == "replace":
            parent[key] = data.draw(json_values)
        elif action == "delete":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += data.draw(st.sampled_from([-1, 1, 100]))
    return doc


@FUZZ
@given(st.data(), st.sampled_from(["ui0.4", "ui1", "api"]))
def test_mutated_valid_workflows(data, kind):
    if kind == "api":
        doc = txt2img_api()
    else:
        nodes = txt2img_ui_nodes() + [{"id": 30, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": None}],
                                    "outputs": [{"name": "", "type": "*", "links": []}]}]
        nodes[4]["mode"] = data.draw(st.sampled_from([0, 2, 4]))
        doc = ui_workflow(nodes, TXT2IMG_LINKS, 1 if kind == "ui1" else 0.4)
    load_validate_run(mutate(doc, data))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 400))
def test_damaged_png(noise, cut):
    raw = png_with_text(prompt=txt2img_api())
    load_validate_run(raw[:cut] + noise)
    load_validate_run(b"\x89PNG\r\n\x1a\n" + noise)


def test_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import ldm_core.graph as g\n"
        "from graph_toys import toy_registry\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "bad = [m for m in sys.modules if m.startswith('ldm_core.') and not m.startswith('ldm_core.graph')"
        " and m != 'ldm_core.errors']\n"
        "assert not bad, bad\n"
        "print(g.Executor(toy_registry()).run({'1': {'class_type': 'Show', 'inputs': {'value': ['2', 0]}},"
        " '2': {'class_type': 'Const', 'inputs': {'value': 4}}}).ui['1'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'value': 4}"
