"""Validation: one test per issue code, and every problem reported in one go."""
from __future__ import annotations

import copy

import pytest
from graph_toys import toy_registry

from ldm_core.graph import ValidationError, check, parse_api, validate
from ldm_core.graph.spec import COMBO, InputSpec, NodeSpec, OutputSpec

REG = toy_registry()

GOOD = {
    "1": {"class_type": "Loader", "inputs": {"ckpt_name": "tiny.ckpt"}},
    "2": {"class_type": "Encode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
    "3": {"class_type": "Encode", "inputs": {"clip": ["1", 1], "text": ""}},
    "4": {"class_type": "EmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "5": {"class_type": "Sampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0],
        "seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler"}},
    "6": {"class_type": "Decode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "Save", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
}


def prompt_with(changes: dict | None = None, drop: tuple = (), **nodes) -> dict:
    """GOOD with some inputs changed ({node: {input: value or None to delete}}) and nodes added/replaced."""
    api = copy.deepcopy(GOOD)
    for node_id, inputs in (changes or {}).items():
        for name, value in inputs.items():
            if value is None:
                api[node_id]["inputs"].pop(name, None)
            else:
                api[node_id]["inputs"][name] = value
    for node_id in drop:
        del api[node_id]
    api.update({k.lstrip("n"): v for k, v in nodes.items()})
    return parse_api(api)


def issues_of(prompt, registry=REG, **kw):
    return [(i.code, i.node_id, i.input_name, i.severity) for i in validate(prompt, registry, **kw)]


def only_error(prompt, registry=REG, **kw):
    with pytest.raises(ValidationError) as info:
        check(prompt, registry, **kw)
    errors = info.value.errors
    assert len(errors) == 1, info.value.report()
    return errors[0]


def test_good_prompt_has_no_issues():
    assert validate(prompt_with(), REG) == []
    assert check(prompt_with(), REG) == []


def test_unknown_node_type():
    issue = only_error(prompt_with(n6={"class_type": "Decod", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}))
    assert (issue.code, issue.node_id, issue.class_type) == ("unknown_node_type", "6", "Decod")
    assert "did you mean 'Decode'" in issue.message


def test_missing_required_input():
    issue = only_error(prompt_with({"5": {"steps": None}}))
    assert (issue.code, issue.node_id, issue.input_name) == ("missing_required_input", "5", "steps")
    assert validate(prompt_with({"5": {"denoise": None}}), REG) == []  # optional


def test_link_to_missing_node():
    issue = only_error(prompt_with({"6": {"vae": ["99", 2]}}))
    assert (issue.code, issue.input_name) == ("link_to_missing_node", "vae") and "99" in issue.message


def test_bad_output_slot():
    issue = only_error(prompt_with({"6": {"vae": ["1", 3]}}))
    assert (issue.code, issue.input_name) == ("bad_output_slot", "vae") and "3 outputs" in issue.message


@pytest.mark.parametrize("name, link", [
    ("vae", ["1", 0]),        # a model where a VAE goes
    ("samples", ["4", 1]),    # EmptyLatent has one output: bad slot, tested above; here use a type
])
def test_type_mismatch_sockets(name, link):
    if name == "samples":
        link = ["2", 0]       # conditioning into a LATENT input
    issue = only_error(prompt_with({"6": {name: link}}))
    assert (issue.code, issue.input_name) == ("type_mismatch", name)


@pytest.mark.parametrize("name", ["cfg", "sampler_name"])
def test_type_mismatch_widget_fed_by_link(name):
    """A FLOAT or COMBO widget converted to an input must be fed by a FLOAT / COMBO output."""
    issue = only_error(prompt_with({"5": {name: ["8", 0]}}, n8={"class_type": "Const", "inputs": {"value": 3}}))
    assert (issue.code, issue.input_name) == ("type_mismatch", name)
    assert validate(prompt_with({"5": {"steps": ["8", 0]}}, n8={"class_type": "Const", "inputs": {"value": 3}}), REG) == []


def test_any_type_accepts_anything():
    reg = dict(REG, Anything=NodeSpec("Anything", "Anything", "t", lambda ctx, **kw: {"ui": kw},
                                      (InputSpec("x", "*"),), output_node=True))
    assert validate(prompt_with(n8={"class_type": "Anything", "inputs": {"x": ["1", 0]}}), reg) == []
    assert not [i for i in validate(prompt_with(n8={"class_type": "Anything", "inputs": {"x": {"__value__": [1]}}}), reg)]


@pytest.mark.parametrize("name, value", [
    ("steps", "abc"), ("steps", "5"), ("steps", True), ("steps", 2.5), ("cfg", "7"), ("cfg", float("nan")),
    ("cfg", False), ("model", "sd15.safetensors"),
])
def test_invalid_value_type(name, value):
    issue = only_error(prompt_with({"5": {name: value}}))
    assert (issue.code, issue.input_name) == ("invalid_value_type", name)


def test_integral_float_is_an_int_and_int_is_a_float():
    assert validate(prompt_with({"5": {"steps": 20.0, "cfg": 7}}), REG) == []


@pytest.mark.parametrize("name, value", [("steps", 0), ("steps", 1001), ("cfg", -0.5), ("cfg", 100.5)])
def test_value_out_of_range(name, value):
    issue = only_error(prompt_with({"5": {name: value}}))
    assert (issue.code, issue.input_name) == ("value_out_of_range", name)
    assert "minimum" in issue.message or "maximum" in issue.message


def test_value_not_in_list_static_and_context_choices():
    issue = only_error(prompt_with({"5": {"sampler_name": "eulr"}}))
    assert issue.code == "value_not_in_list" and "did you mean 'euler'" in issue.message
    reg = dict(REG, Loader=NodeSpec("Loader", "Loader", "t", lambda ctx, **kw: ("m", "c", "v"),
                                    (InputSpec("ckpt_name", COMBO, choices=lambda ctx: ctx["models"]),),
                                    (OutputSpec("TOY_MODEL"), OutputSpec("TOY_CLIP"), OutputSpec("TOY_VAE"))))
    assert validate(prompt_with(), reg, context={"models": ["tiny.ckpt"]}) == []
    issue = only_error(prompt_with(), reg, context={"models": ["other.ckpt"]})
    assert (issue.code, issue.input_name) == ("value_not_in_list", "ckpt_name")
    issue = only_error(prompt_with(), reg, context={"models": []})
    assert "no choices" in issue.message
    issue = only_error(prompt_with(), reg, context=None)  # the choice function fails: reported, not raised
    assert issue.code == "choices_unavailable"


def test_cycle():
    issue = only_error(prompt_with(
        n10={"class_type": "Add", "inputs": {"a": ["11", 0]}},
        n11={"class_type": "Add", "inputs": {"a": ["10", 0], "b": 1}},
        n12={"class_type": "Show", "inputs": {"value": ["11", 0]}}))
    assert issue.code == "cycle" and "10, 11" in issue.message
    self_loop = only_error(prompt_with(n10={"class_type": "Add", "inputs": {"a": ["10", 0]}},
                                       n12={"class_type": "Show", "inputs": {"value": ["10", 0]}}))
    assert self_loop.code == "cycle"


def test_no_output_node():
    issue = only_error(prompt_with(drop=("7",)))
    assert (issue.code, issue.node_id) == ("no_output_node", None)
    assert validate(prompt_with(drop=("7",)), REG, outputs=["6"]) == []  # unless outputs are named


def test_unknown_output_requested():
    issue = only_error(prompt_with(), outputs=["7", "42"])
    assert (issue.code, issue.node_id) == ("unknown_output_requested", "42")


def test_unknown_input_is_a_warning():
    prompt = prompt_with({"5": {"scheduler": "karras"}})
    warnings = check(prompt, REG)
    assert [(w.code, w.input_name, w.severity) for w in warnings] == [("unknown_input", "scheduler", "warning")]


def test_problems_in_unused_nodes_are_warnings():
    prompt = prompt_with(n20={"class_type": "Const", "inputs": {"value": "x"}})
    assert [(w.code, w.severity) for w in check(prompt, REG)] == [("invalid_value_type", "warning")]
    with pytest.raises(ValidationError):  # but an unknown type is always an error
        check(prompt_with(n20={"class_type": "Mystery", "inputs": {}}), REG)


def test_all_problems_reported_at_once():
    prompt = prompt_with(
        {"2": {"clip": ["1", 0]}, "4": {"width": 8, "height": "tall"}, "5": {"steps": None, "sampler_name": "x"},
         "6": {"vae": ["1", 9]}},
        n8={"class_type": "Mystery", "inputs": {"a": ["1", 0], "b": ["60", 0]}},
        n9={"class_type": "Show", "inputs": {"value": ["8", 0]}},
        n10={"class_type": "Add", "inputs": {"a": ["11", 0]}},
        n11={"class_type": "Add", "inputs": {"a": ["10", 0], "typo": 1}},
        n12={"class_type": "Show", "inputs": {"value": ["11", 0]}},
    )
    with pytest.raises(ValidationError) as info:
        check(prompt, REG)
    found = {(i.code, i.node_id, i.input_name) for i in info.value.issues}
    assert found == {
        ("type_mismatch", "2", "clip"), ("value_out_of_range", "4", "width"), ("invalid_value_type", "4", "height"),
        ("missing_required_input", "5", "steps"), ("value_not_in_list", "5", "sampler_name"),
        ("bad_output_slot", "6", "vae"), ("link_to_missing_node", "8", "b"), ("unknown_node_type", "8", None),
        ("cycle", "10", None), ("unknown_input", "11", "typo"),
    }
    report = str(info.value)
    assert report.startswith("workflow is invalid: 9 errors, 1 warning")
    assert "node 5 (Sampler), input 'steps' [missing_required_input]" in report
