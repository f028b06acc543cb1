"""Loading workflows: API and editor formats (0.4 and 1), widgets, bypass, mute, reroutes,
primitives, notes, PNG chunks. Every UI case is compared with the API prompt the editor
would have queued for it."""
from __future__ import annotations

import io
import json

import pytest
from graph_toys import (
    SAMPLER_INPUTS,
    TXT2IMG_LINKS,
    png_with_text,
    toy_registry,
    txt2img_api,
    txt2img_ui_nodes,
    ui_node,
    ui_workflow,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_core.graph import Link, PromptNode, WorkflowError, detect_format, load_workflow, parse_api, to_api
from ldm_core.graph.spec import BOOLEAN, INT, STRING, InputSpec, NodeSpec

REG = toy_registry()
TXT2IMG_API = txt2img_api()


def strip_titles(prompt: dict) -> dict:
    return {k: (v.class_type, v.inputs) for k, v in prompt.items()}


def expected(**changes: dict) -> dict:
    api = json.loads(json.dumps(TXT2IMG_API))
    for node_id, inputs in changes.items():
        api[node_id]["inputs"].update(inputs)
        for name in [n for n, v in inputs.items() if v is None]:
            del api[node_id]["inputs"][name]
    return strip_titles(parse_api(api))


# --- API format -----------------------------------------------------------------------------

def test_api_format_and_wrapper():
    direct = load_workflow(TXT2IMG_API, REG)
    assert direct["3"].inputs["model"] == Link("4", 0)
    assert direct["3"].inputs["seed"] == 42
    wrapped = load_workflow({"prompt": TXT2IMG_API, "client_id": "abc", "extra_data": {}}, REG)
    assert strip_titles(wrapped) == strip_titles(direct)
    assert detect_format({"prompt": TXT2IMG_API})[0] == "api"


def test_api_value_wrapper_and_round_trip():
    api = {"1": {"class_type": "Const", "inputs": {"value": {"__value__": [1, 2]}}, "_meta": {"title": "c"}}}
    prompt = load_workflow(api, REG)
    assert prompt["1"].inputs["value"] == [1, 2] and prompt["1"].title == "c"
    assert to_api(prompt) == api
    full = load_workflow(TXT2IMG_API, REG)
    assert strip_titles(parse_api(to_api(full))) == strip_titles(full)


@pytest.mark.parametrize("bad, fragment", [
    ({"1": {"class_type": "Const", "inputs": {"value": ["2"]}}}, "link must be"),
    ({"1": {"class_type": "Const", "inputs": {"value": ["2", -1]}}}, "link must be"),
    ({"1": {"inputs": {}}, "2": {"class_type": "Const"}}, "class_type"),
    ({"1": {"class_type": "Const", "inputs": []}}, "'inputs' must be an object"),
    ([1, 2], "cannot load a workflow from a list"),
    ("[1, 2]", "not a ComfyUI workflow"),
    ({}, "not a ComfyUI workflow"),
    ({"nodes": "x"}, "not a ComfyUI workflow"),
])
def test_api_malformed(bad, fragment):
    with pytest.raises(WorkflowError, match=fragment):
        load_workflow(bad, REG)


def test_json_text_path_and_bad_json(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(TXT2IMG_API))
    assert strip_titles(load_workflow(path, REG)) == expected()
    assert strip_titles(load_workflow(str(path), REG)) == expected()
    assert strip_titles(load_workflow(json.dumps(TXT2IMG_API), REG)) == expected()
    path.write_text("{not json")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(path, REG)
    with pytest.raises(WorkflowError, match="cannot read"):
        load_workflow(tmp_path / "missing.json", REG)


# --- UI format ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [0.4, 1])
def test_ui_matches_api(version):
    wf = ui_workflow(txt2img_ui_nodes(), TXT2IMG_LINKS, version)
    assert detect_format(wf)[0] == "ui"
    assert strip_titles(load_workflow(wf, REG)) == expected()


def test_widgets_without_control_value():
    wf = ui_workflow(txt2img_ui_nodes((42, 20, 7.5, "heun", 0.8, False)), TXT2IMG_LINKS)
    assert strip_titles(load_workflow(wf, REG)) == expected()


@pytest.mark.parametrize("control", ["fixed", "increment", "decrement", "randomize"])
def test_each_control_value_is_skipped(control):
    wf = ui_workflow(txt2img_ui_nodes((7, control, 20, 7.5, "heun", 0.8, False)), TXT2IMG_LINKS, 1)
    assert load_workflow(wf, REG)["3"].inputs["seed"] == 7


def test_boolean_control_value_of_2023_files():
    wf = ui_workflow(txt2img_ui_nodes((42, True, 20, 7.5, "heun", 0.8, False)), TXT2IMG_LINKS)
    assert strip_titles(load_workflow(wf, REG)) == expected()


def test_control_word_that_is_the_next_widgets_value():
    """A STRING after a seed may itself hold "fixed": only a spare value is a control value."""
    spec = NodeSpec("Seeded", "Seeded", "t", lambda ctx, **kw: (), (
        InputSpec("seed", INT, 0, control_after_generate=True), InputSpec("mode", STRING, "")))
    reg = {"Seeded": spec}
    without = ui_workflow([ui_node(1, "Seeded", widgets=[5, "fixed"])], [])
    with_control = ui_workflow([ui_node(1, "Seeded", widgets=[5, "randomize", "fixed"])], [])
    assert load_workflow(without, reg)["1"].inputs == {"seed": 5, "mode": "fixed"}
    assert load_workflow(with_control, reg)["1"].inputs == {"seed": 5, "mode": "fixed"}
    flagged = {"Flagged": NodeSpec("Flagged", "Flagged", "t", lambda ctx, **kw: (), (
        InputSpec("seed", INT, 0, control_after_generate=True), InputSpec("flag", BOOLEAN, False)))}
    assert load_workflow(ui_workflow([ui_node(1, "Flagged", widgets=[5, True])], []), flagged)["1"].inputs == {
        "seed": 5, "flag": True}
    assert load_workflow(ui_workflow([ui_node(1, "Flagged", widgets=[5, True, False])], []), flagged)["1"].inputs == {
        "seed": 5, "flag": False}


def test_dict_widgets_values_map_by_name():
    widgets = {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 7.5, "sampler_name": "heun",
               "denoise": 0.8, "add_noise": False}
    wf = ui_workflow(txt2img_ui_nodes(widgets), TXT2IMG_LINKS)
    assert strip_titles(load_workflow(wf, REG)) == expected()


def test_missing_widget_values_take_spec_defaults():
    wf = ui_workflow(txt2img_ui_nodes((42, "fixed", 20)), TXT2IMG_LINKS)
    inputs = load_workflow(wf, REG)["3"].inputs
    assert (inputs["cfg"], inputs["sampler_name"], inputs["denoise"], inputs["add_noise"]) == (7.0, "euler", 1.0, True)


def test_converted_widget_link_wins_and_primitive_value():
    nodes = txt2img_ui_nodes()
    sampler = next(n for n in nodes if n["id"] == 3)
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": 10, "widget": {"name": "seed"}})
    sampler["inputs"].append({"name": "steps", "type": "INT", "link": 11, "widget": {"name": "steps"}})
    nodes.append(ui_node(20, "Const", outputs=[("value", "INT")], widgets=[5]))
    nodes.append(ui_node(21, "PrimitiveNode", outputs=[("INT", "INT")], widgets=[33, "fixed"]))
    links = list(TXT2IMG_LINKS) + [(10, 20, 0, 3, 4, "INT"), (11, 21, 0, 3, 5, "INT")]
    prompt = load_workflow(ui_workflow(nodes, links, 1), REG)
    assert prompt["3"].inputs["seed"] == Link("20", 0)
    assert prompt["3"].inputs["steps"] == 33
    assert "21" not in prompt


def test_reroute_chain():
    nodes = txt2img_ui_nodes()
    nodes[4]["inputs"][0]["link"] = 30  # Sampler.model now comes through two reroutes
    nodes += [ui_node(30, "Reroute", [("", "*", 31)], [("", "TOY_MODEL")]),
              ui_node(31, "Reroute", [("", "*", 32)], [("", "TOY_MODEL")])]
    links = [link for link in TXT2IMG_LINKS if link[0] != 1] + [
        (32, 4, 0, 31, 0, "TOY_MODEL"), (31, 31, 0, 30, 0, "TOY_MODEL"), (30, 30, 0, 3, 0, "TOY_MODEL")]
    prompt = load_workflow(ui_workflow(nodes, links), REG)
    assert strip_titles(prompt) == expected()


def test_a_chain_of_thousands_of_reroutes_is_followed_without_recursion():
    """A probe found 497 chained reroutes exhausting Python's stack (issue 27); the resolver loops."""
    n = 3000
    nodes = txt2img_ui_nodes()
    nodes[4]["inputs"][0]["link"] = 1000  # Sampler.model through n reroutes: 1000 + k feeds reroute k's consumer
    nodes += [ui_node(100 + k, "Reroute", [("", "*", 1001 + k)], [("", "TOY_MODEL")]) for k in range(n)]
    links = [link for link in TXT2IMG_LINKS if link[0] != 1]
    links += [(1000, 100, 0, 3, 0, "TOY_MODEL")]  # reroute 0 → sampler
    links += [(1001 + k, 101 + k, 0, 100 + k, 0, "TOY_MODEL") for k in range(n - 1)]  # reroute k+1 → reroute k
    links += [(1000 + n, 4, 0, 100 + n - 1, 0, "TOY_MODEL")]  # the loader → the last reroute
    prompt = load_workflow(ui_workflow(nodes, links), REG)
    assert strip_titles(prompt) == expected()


def test_bypass_passes_matching_input_through():
    nodes = txt2img_ui_nodes()
    nodes[4]["mode"] = 4  # bypass the sampler: Decode.samples gets the empty latent
    prompt = load_workflow(ui_workflow(nodes, TXT2IMG_LINKS), REG)
    assert "3" not in prompt
    assert prompt["8"].inputs["samples"] == Link("5", 0)


def test_bypass_chain():
    nodes = txt2img_ui_nodes()
    second = ui_node(10, "Sampler", list(SAMPLER_INPUTS[:3]) + [("latent", "LATENT", 7)], [("LATENT", "LATENT")],
                     (1, 20, 7.5, "heun"), mode=4)
    second["inputs"] = [{**s, "link": None} for s in second["inputs"][:3]] + [second["inputs"][3]]
    nodes[4]["mode"] = 4
    nodes.append(second)
    links = [link for link in TXT2IMG_LINKS if link[0] != 7] + [(7, 3, 0, 10, 3, "LATENT"), (12, 10, 0, 8, 0, "LATENT")]
    nodes[5]["inputs"][0]["link"] = 12
    prompt = load_workflow(ui_workflow(nodes, links, 1), REG)
    assert prompt["8"].inputs["samples"] == Link("5", 0)
    assert "3" not in prompt and "10" not in prompt


def test_bypass_prefers_same_slot_and_drops_unmatched():
    # An unregistered two-in/two-out node: bypass works from the workflow's own slot types.
    nodes = [
        ui_node(1, "Const", outputs=[("value", "INT")], widgets=[1]),
        ui_node(2, "Const", outputs=[("value", "INT")], widgets=[2]),
        ui_node(3, "Swap", [("a", "INT", 1), ("b", "INT", 2)], [("x", "INT"), ("y", "INT")], mode=4),
        ui_node(4, "Add", [("a", "INT", 3), ("b", "INT", 4, "b")], [("sum", "INT")], widgets=[0]),
        ui_node(5, "Decode", [("samples", "LATENT", 5), ("vae", "TOY_VAE", None)], [("IMAGE", "IMAGE")], mode=4),
        ui_node(6, "Save", [("images", "IMAGE", 6)], widgets=["x"]),
    ]
    links = [(1, 1, 0, 3, 0, "INT"), (2, 2, 0, 3, 1, "INT"), (3, 3, 1, 4, 0, "INT"), (4, 3, 0, 4, 1, "INT"),
             (6, 5, 0, 6, 0, "IMAGE")]
    prompt = load_workflow(ui_workflow(nodes, links), REG)
    assert prompt["4"].inputs == {"a": Link("2", 0), "b": Link("1", 0)}
    assert "images" not in prompt["6"].inputs  # no IMAGE input to pass through


def test_mute_drops_node_and_its_links():
    nodes = txt2img_ui_nodes()
    nodes[1]["mode"] = 2  # mute the positive prompt encoder
    prompt = load_workflow(ui_workflow(nodes, TXT2IMG_LINKS), REG)
    assert "6" not in prompt and "positive" not in prompt["3"].inputs
    assert prompt["3"].inputs["negative"] == Link("7", 0)


def test_notes_and_groups_ignored():
    nodes = txt2img_ui_nodes() + [ui_node(40, "Note", widgets=["remember"]), ui_node(41, "MarkdownNote", widgets=["# hi"])]
    wf = ui_workflow(nodes, TXT2IMG_LINKS, 1, groups=[{"id": 1, "title": "g", "bounding": [0, 0, 10, 10]}])
    assert strip_titles(load_workflow(wf, REG)) == expected()


def test_unknown_node_type_is_kept_for_validation():
    nodes = txt2img_ui_nodes()
    nodes[5]["type"] = "FancyDecode"
    prompt = load_workflow(ui_workflow(nodes, TXT2IMG_LINKS), REG)
    assert prompt["8"].class_type == "FancyDecode" and prompt["8"].inputs["samples"] == Link("3", 0)


def test_subgraph_is_a_clear_error():
    nodes = txt2img_ui_nodes() + [ui_node(50, "a1b2c3d4-0000-4000-8000-000000000000", widgets=[])]
    wf = ui_workflow(nodes, TXT2IMG_LINKS, 1, definitions={"subgraphs": [
        {"id": "a1b2c3d4-0000-4000-8000-000000000000", "name": "Upscale", "nodes": [], "links": []}]})
    with pytest.raises(WorkflowError, match="subgraph 'Upscale'.*not supported yet"):
        load_workflow(wf, REG)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda wf: wf["nodes"][1]["inputs"][0].update(link=99), "link 99"),
    (lambda wf: wf["nodes"][1].update(mode="on"), "'mode' must be an integer"),
    (lambda wf: wf["nodes"][1].update(id=4), "appears twice"),
    (lambda wf: wf["links"].append("x"), "a link must be"),
    (lambda wf: wf.update(version=3), "unsupported workflow version"),
    (lambda wf: wf["nodes"][1].update(widgets_values="a cat"), "'widgets_values' must be"),
    (lambda wf: [n.update(mode=2) for n in wf["nodes"]], "no node to run"),
])
def test_ui_malformed(mutate, fragment):
    wf = ui_workflow(txt2img_ui_nodes(), TXT2IMG_LINKS)
    mutate(wf)
    with pytest.raises(WorkflowError, match=fragment):
        load_workflow(wf, REG)


def test_reroute_loop_is_an_error():
    nodes = [ui_node(1, "Reroute", [("", "*", 1)], [("", "*")]), ui_node(2, "Reroute", [("", "*", 2)], [("", "*")]),
             ui_node(3, "Save", [("images", "IMAGE", 3)], widgets=["x"])]
    links = [(1, 2, 0, 1, 0, "*"), (2, 1, 0, 2, 0, "*"), (3, 1, 0, 3, 0, "*")]
    with pytest.raises(WorkflowError, match="loop"):
        load_workflow(ui_workflow(nodes, links), REG)


# --- PNG ------------------------------------------------------------------------------------

def test_png_round_trip_prefers_prompt(tmp_path):
    ui = ui_workflow(txt2img_ui_nodes((7, "fixed", 20, 7.5, "heun", 0.8, False)), TXT2IMG_LINKS)  # seed 7 here
    raw = png_with_text(prompt=TXT2IMG_API, workflow=ui)  # seed 42 in the prompt chunk
    path = tmp_path / "image.png"
    path.write_bytes(raw)
    assert load_workflow(path, REG)["3"].inputs["seed"] == 42
    assert load_workflow(raw, REG)["3"].inputs["seed"] == 42
    assert load_workflow(path, REG, prefer="workflow")["3"].inputs["seed"] == 7
    only_ui = tmp_path / "ui.png"
    only_ui.write_bytes(png_with_text(workflow=ui))
    assert strip_titles(load_workflow(only_ui, REG)) == expected(**{"3": {"seed": 7}})


def test_png_without_workflow_or_damaged(tmp_path):
    with pytest.raises(WorkflowError, match="carries no workflow"):
        load_workflow(png_with_text(parameters="a cat"), REG)
    with pytest.raises(WorkflowError, match="cannot read the image"):
        load_workflow(png_with_text(prompt=TXT2IMG_API)[:40], REG)
    bad = PngInfo()
    bad.add_text("prompt", "{broken")
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG", pnginfo=bad)
    with pytest.raises(WorkflowError, match="prompt chunk"):
        load_workflow(buf.getvalue(), REG)


def test_prompt_nodes_pass_through():
    prompt = {"1": PromptNode("Const", {"value": 3})}
    assert load_workflow(prompt, REG) == prompt
