"""The embedded model (issue 7): shipped, found with no models folder, loaded through the normal
detection path, and measurably good — the end-to-end test that fails when a sampler, the
tokenizer, cross-attention or the VAE breaks. Full numbers: `python -m bench.quality`."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldm_core.checkpoints.embedded import EMBEDDED_NAME, EMBEDDED_PATH, embedded_checkpoint
from ldm_core.checkpoints.model_family import CONFIG_METADATA_KEY
from ldm_core.lab.adherence import Settings, adherence, eval_scenes, reconstruction_psnr
from ldm_core.loading.loader import load_checkpoint, load_layout_encoder
from ldm_nodes.cli import main as ldm_run
from ldm_nodes.context import NodeContext

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SEED_LAYOUT_TEST = 424_242

pytestmark = pytest.mark.skipif(embedded_checkpoint() is None, reason="the embedded checkpoint is not in this checkout")


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(EMBEDDED_PATH, device="cpu")


def test_ships_as_one_small_sd_layout_file_with_its_config(ckpt):
    assert EMBEDDED_PATH.stat().st_size <= 25_000_000
    with safe_open(str(EMBEDDED_PATH), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model", "layout_stage_model"}
    assert dtypes == {"F16"}
    assert json.loads(meta[CONFIG_METADATA_KEY])["family"] == "scenes"
    assert ckpt.config.family == "scenes" and ckpt.vae.factor == 4
    assert ckpt.text_encoder is not None and ckpt.layout_encoder is not None


def test_the_ldm_command_finds_it_by_name_and_makes_its_native_size(tmp_path, monkeypatch):
    from ldm_core.__main__ import main as ldm

    monkeypatch.chdir(tmp_path)  # no file of that name here: the shipped one is meant
    assert ldm(["txt2img", EMBEDDED_NAME, "a red circle in the top left", "--steps", "4", "--output-dir", "out"]) == 0
    (written,) = (tmp_path / "out").glob("*.png")
    assert Image.open(written).size == (64, 64)  # the size it was trained at, not 512²


def test_found_with_no_models_folder(tmp_path):
    ctx = NodeContext.headless()
    assert EMBEDDED_NAME in ctx.list_models("checkpoints")
    assert ctx.model_path("checkpoints", EMBEDDED_NAME) == EMBEDDED_PATH
    assert load_layout_encoder(EMBEDDED_PATH).config.classes[:2] == ("red circle", "red square")
    # ComfyUI's core CheckpointLoaderSimple (the editor-format workflow) finds it by file name
    assert ldm_run([str(WORKFLOWS / "core_txt2img_ui.json"), "--output-dir", str(tmp_path), "--quiet",
                    "--set", "3.steps=4"]) == 0
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (64, 64)


def test_reconstruction_psnr_at_least_30_db(ckpt):
    scenes = eval_scenes({1: 8, 2: 8, 3: 8}, seed=123_456)
    db = reconstruction_psnr(ckpt, scenes)
    print(f"reconstruction PSNR {db:.2f} dB")
    assert db >= 30.0


def test_pictures_follow_their_prompts(ckpt):
    """Default settings (DPM++ 2M Karras, 20 steps, CFG 5), 16 held-out one-object captions:
    colour and shape right: issue 7's target of 0.9. Two-object captions (24, so that one prompt
    is not the whole margin): issue 7's target of 0.75. Position words and relations: issue 7's
    target of 0.75 (the bench measures 0.91; the staged recipe's base model 0.12). The full table:
    `python -m bench.quality`."""
    r = adherence(ckpt, eval_scenes({1: 16}), Settings())
    print(r)
    assert r["objects_correct_1"] >= 0.9
    r2 = adherence(ckpt, eval_scenes({2: 24}), Settings())
    print(r2)
    assert r2["objects_correct_2"] >= 0.75
    spatial = [v for v in (r["spatial_correct"], r2["spatial_correct"]) if v == v]  # nan: no position stated
    assert spatial and sum(spatial) / len(spatial) >= 0.75


def test_corner_words_move_the_object(ckpt):
    """The words decide where: for one seed, the four corner prompts put the red circle in four
    different quadrants, each the one its words name (the staged recipe's base model put all four on
    one pixel)."""
    from ldm_core.lab.adherence import generate
    from ldm_core.lab.detector import detect_objects

    corners = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
    conds = [ckpt.text_encoder.encode(f"a red circle in the {c}") for c in corners]
    images = generate(ckpt, conds, Settings())
    for (words, (qx, qy)), image in zip(corners.items(), images):
        found = [d for d in detect_objects(image) if d.label == ("red", "circle")]
        assert found, f"no red circle for {words!r}"
        x0, y0, x1, y1 = found[0].bbox
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert (int(cx >= 32), int(cy >= 32)) == (qx, qy), (words, (cx, cy))


def test_layout_tokens_reach_the_picture(ckpt):
    """Layout-to-image wiring end to end: the box tokens change the sampled picture (the same
    seed with the "" prompt alone differs). Box IoU is measured by the bench, not asserted."""
    from ldm_core.lab.adherence import generate, layout_cond

    scene = eval_scenes({2: 1}, seed=654_321)[0]
    with_layout = generate(ckpt, [layout_cond(ckpt, scene)], Settings(steps=8))
    without = generate(ckpt, [ckpt.text_encoder.encode("")], Settings(steps=8))
    assert (with_layout - without).abs().mean().item() > 0.02


def test_layouts_put_objects_in_their_boxes(ckpt):
    """Layout-to-image from boxes alone (prompt ""), default settings, 12 held-out layouts of one to
    three objects (the bench scores layouts on another stream): issue 7's target, box IoU ≥ 0.5 for at
    least 80% of the objects (the bench measures 0.835 on 249 objects; the staged recipe's ground
    model 0.20)."""
    from ldm_core.lab.adherence import layout_scores

    r = layout_scores(ckpt, eval_scenes({1: 4, 2: 4, 3: 4}, seed=SEED_LAYOUT_TEST), Settings())
    print(r)
    assert r["iou_at_least_0.5"] >= 0.8


def test_a_broken_text_path_is_caught(ckpt, monkeypatch):
    """The quality test is a real end-to-end check: with the prompts' cross-attention input
    zeroed (as if the text encoder broke), adherence collapses (0 of 16 measured)."""
    scenes = eval_scenes({1: 16})
    original = ckpt.text_encoder.encode

    def zeroed(prompt: str):
        cond = original(prompt)
        return type(cond)(context=torch.zeros_like(cond.context))

    monkeypatch.setattr(ckpt.text_encoder, "encode", zeroed)
    r = adherence(ckpt, scenes, Settings())
    print(r)
    assert r["objects_correct_1"] < 0.15
