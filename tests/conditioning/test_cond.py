"""Conditioning operations: parity with ComfyUI's ConditioningAverage / ConditioningConcat
(recorded by tests/tools/record_cond_refs.py), known answers for the rest, and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm_core.conditioning import cond as C
from ldm_core.conditioning.cond import Area, Cond, ConditioningError

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def ref():
    with safe_open(DATA / "cond_node_refs.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_average_matches_comfyui_cut_and_pad(ref):
    cut = C.average([Cond(ref["to77"], ref["pool_to"])], [Cond(ref["from154"], ref["pool_from"])], 0.3)
    torch.testing.assert_close(cut[0].context, ref["avg_cut"], atol=0, rtol=0)
    torch.testing.assert_close(cut[0].pooled, ref["avg_cut_pooled"], atol=0, rtol=0)
    # `to` has no pooled vector: it takes `from`'s; `from` (77 tokens) is zero-padded to 154
    pad = C.average([Cond(ref["to154"])], [Cond(ref["from77"], ref["pool_from"])], 0.65)
    torch.testing.assert_close(pad[0].context, ref["avg_pad"], atol=0, rtol=0)
    torch.testing.assert_close(pad[0].pooled, ref["avg_pad_pooled"], atol=0, rtol=0)
    assert torch.equal(pad[0].context[:, 77:], ref["to154"][:, 77:] * 0.65)


def test_concat_matches_comfyui_and_uses_the_first_from_entry(ref, caplog):
    out = C.concat([Cond(ref["to77"])], [Cond(ref["from154"]), Cond(ref["from77"])])
    assert torch.equal(out[0].context, ref["concat"]) and out[0].context.shape == (1, 231, 8)
    assert "only the first" in caplog.text


def test_combine_zero_out_and_settings_keep_everything_else():
    a = Cond(torch.ones(1, 77, 8), torch.ones(1, 4), extra={"width": 512})
    b = Cond(torch.full((1, 77, 8), 2.0))
    both = C.combine([a], [b])
    assert both[0] is a and both[1] is b
    z = C.zero_out(both)
    assert torch.equal(z[0].context, torch.zeros(1, 77, 8)) and torch.equal(z[0].pooled, torch.zeros(1, 4))
    assert z[0].extra == {"width": 512} and z[1].pooled is None
    ranged = C.set_timestep_range(both, 0.2, 0.7)
    assert (ranged[1].start_percent, ranged[1].end_percent) == (0.2, 0.7)
    area = C.set_area(ranged, 200, 100, 17, 64, strength=1.5)
    assert area[0].area == Area(12, 25, 8, 2) and area[0].strength == 1.5  # pixels // 8, as ComfyUI
    assert area[0].start_percent == 0.2 and area[0].extra == {"width": 512}
    pct = C.set_area_percentage(area, 0.5, 0.25, 0.5, 0.0)
    assert pct[0].area == Area(0.25, 0.5, 0.0, 0.5, fraction=True)
    assert pct[0].area.resolve(12, 20) == (3, 10, 0, 10)
    assert Area(0.01, 0.5, 0.125, 0.5, fraction=True).resolve(12, 20) == (1, 10, 2, 10)  # size ≥ 1, round half even
    masked = C.set_mask(pct, torch.ones(16, 16), 0.4, "mask bounds")
    assert masked[0].mask.shape == (1, 16, 16) and masked[0].mask_bounds and masked[0].mask_strength == 0.4
    assert masked[0].area == pct[0].area
    assert not C.set_area(masked, 64, 64, 0, 0)[0].mask_bounds  # a new area replaces "mask bounds"


@pytest.mark.parametrize("call, match", [
    (lambda c: C.set_timestep_range(c, -0.1, 1.0), "start"),
    (lambda c: C.set_area_percentage(c, 1.5, 1.0, 0.0, 0.0), "width"),
    (lambda c: C.set_area(c, 4, 64, 0, 0), "smaller than one latent cell"),
    (lambda c: C.set_area_strength(c, float("nan")), "strength"),
    (lambda c: C.set_mask(c, torch.ones(1, 1, 4, 4)), "MASK"),
    (lambda c: C.set_mask(c, torch.ones(4, 4), set_cond_area="bounds"), "set_cond_area"),
    (lambda c: C.average(c, [], 0.5), "conditioning_from is empty"),
    (lambda c: C.average(c, [Cond(torch.ones(1, 77, 16))], 0.5), "same model"),
    (lambda c: C.combine(c, "text"), "conditioning_2"),
])
def test_bad_inputs_name_the_input(call, match):
    with pytest.raises(ConditioningError, match=match):
        call([Cond(torch.ones(1, 77, 8))])


# ---- nodes ----

def test_core_conditioning_nodes_keep_comfyui_inputs_and_run():
    from ldm_nodes.registry import CORE_NODES, headless_registry

    reg = headless_registry()
    assert tuple(i.name for i in reg["ConditioningSetMask"].inputs) == ("conditioning", "mask", "strength",
                                                                        "set_cond_area")
    assert CORE_NODES["ConditioningZeroOut"][0] == "LDMConditioningZeroOut"
    for core_id in ("ConditioningCombine", "ConditioningAverage", "ConditioningConcat", "ConditioningSetArea",
                    "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength", "ConditioningSetMask",
                    "ConditioningZeroOut", "ConditioningSetTimestepRange"):
        assert reg[core_id].inputs[0].type == "CONDITIONING" and reg[core_id].outputs[0].type == "CONDITIONING"
    area = reg["ConditioningSetArea"]
    assert (area.input("width").min, area.input("width").step, area.input("strength").max) == (64, 8, 10.0)
    c = [Cond(torch.ones(1, 77, 8))]
    (out,) = reg["ConditioningSetArea"].run(None, conditioning=c, width=128, height=64, x=8, y=16, strength=0.5)
    assert out[0].area == Area(8, 16, 2, 1) and out[0].strength == 0.5
    (out,) = reg["ConditioningSetMask"].run(None, conditioning=c, mask=torch.ones(8, 8), strength=0.3,
                                            set_cond_area="mask bounds")
    assert out[0].mask_bounds and out[0].mask_strength == 0.3


def test_regional_workflow_runs_headless(tmp_path):
    """Area + layout boxes + global prompt, combined, time-limited, against a zeroed negative."""
    from ldm_core.checkpoints.synthetic import save_checkpoint
    from ldm_core.networks.presets import PRESETS, shrink
    from ldm_nodes.cli import main as ldm_run

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    save_checkpoint(shrink(PRESETS["sd1"]), tmp_path / "models" / "checkpoints" / "tiny.safetensors", seed=1)
    wf = {
        "1": {"class_type": "LDMCheckpointLoader", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "LDMTextEncode", "inputs": {"text": "a sky", "clip": ["1", 1]}},
        "3": {"class_type": "LDMConditioningSetArea",
              "inputs": {"conditioning": ["2", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}},
        "4": {"class_type": "LDMLayoutPrompts", "inputs": {
            "clip": ["1", 1], "layout_text": "a red circle | 0 0.5 0.5 1\na blue square | 32 32 64 64 | 1.5",
            "global_prompt": "a field", "strength": 1.0}},
        "5": {"class_type": "LDMConditioningCombine", "inputs": {"conditioning_1": ["3", 0], "conditioning_2": ["4", 0]}},
        "6": {"class_type": "LDMConditioningSetTimestepRange", "inputs": {"conditioning": ["5", 0], "start": 0.0,
                                                                       "end": 0.8}},
        "7": {"class_type": "LDMTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "8": {"class_type": "LDMConditioningZeroOut", "inputs": {"conditioning": ["7", 0]}},
        "9": {"class_type": "LDMEmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "LDMKSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "LDMVAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "LDMSaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "regional"}},
    }
    path = tmp_path / "regional.json"
    path.write_text(json.dumps(wf))
    models, out = str(tmp_path / "models"), str(tmp_path / "out")
    code = ldm_run([str(path), "--models-dir", models, "--output-dir", out, "--quiet"])
    assert code == 0
    assert (tmp_path / "out" / "regional_00001_.png").is_file()


def test_conditioning_nodes_meet_the_comfyui_node_contract():
    from ldm_nodes.comfy_adapter import node_mappings
    from ldm_nodes.conditioning_nodes import specs
    from ldm_nodes.socket_types import OURS

    classes, names = node_mappings({s.id: s for s in specs(OURS)}, context_factory=lambda: None)
    assert len(classes) == 11 and set(classes) == set(names)
    for node_id, cls in classes.items():
        types = cls.INPUT_TYPES()
        assert node_id.startswith("LDM") and cls.CATEGORY.startswith("ldm/") and cls.DESCRIPTION
        for name, value in types["required"].items():
            assert isinstance(value, tuple) and len(value) == 2, (node_id, name)
        assert cls.RETURN_TYPES == ("LDM_CONDITIONING",)
