"""The node pack: ComfyUI's loading simulated, the V1 contract, and every shipped workflow
run headless through `ldm-run` on a generated SD1.5-layout checkpoint."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.checkpoints.embedded import EMBEDDED_PATH
from ldm_core.imaging.image_io import to_pil
from ldm_core.loading.loader import load_checkpoint
from ldm_core.lora.lora_names import random_lora, save_lora
from ldm_nodes.cli import main as ldm_run
from ldm_nodes.comfy_adapter import node_mappings
from ldm_nodes.registry import CORE_NODES, headless_registry, pack_specs

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
SMALL = {  # per workflow: overrides that keep the CPU run to seconds
    "txt2img.json": ["4.width=64", "4.height=48", "5.steps=2"],
    "img2img.json": ["6.steps=3"],
    "hires_fix.json": ["4.width=64", "4.height=64", "5.steps=2", "7.steps=2"],
    "core_txt2img_ui.json": ["5.width=128", "5.height=128", "3.steps=2"],  # core EmptyLatentImage: 1/8 size
    "inpaint.json": ["7.steps=2"],
    "hires_2048.json": ["4.width=64", "4.height=64", "5.steps=2", "7.steps=2", "7.tile_size=128",
                        "7.tile_overlap=64", "8.tile_size=96"],
    "tiled_diffusion.json": ["4.width=192", "4.height=96", "7.steps=2", "7.tile_size=64", "7.tile_overlap=32",
                             "11.width=64", "11.height=64", "11.x=16", "11.y=16", "13.width=64", "13.height=64",
                             "13.x=112", "13.y=16", "8.tile_size=64"],
    "inpaint_mask.json": ["8.steps=2"],
    "regional_prompt.json": ["10.width=128", "10.height=64", "11.steps=2", "6.width=64", "6.height=64",
                             "7.width=64", "7.height=64", "7.x=64"],
    "box_layout.json": ["6.width=64", "6.height=64", "7.steps=2"],
    "lora.json": ["5.width=64", "5.height=48", "6.steps=2"],
}
EXPECTED_SIZE = {"txt2img.json": (64, 48), "img2img.json": (72, 48), "hires_fix.json": (128, 128),
                 "core_txt2img_ui.json": (64, 64), "inpaint.json": (107, 58),
                 "hires_2048.json": (256, 256), "tiled_diffusion.json": (192, 96), "inpaint_mask.json": (72, 48),
                 "regional_prompt.json": (128, 64), "box_layout.json": (64, 64), "lora.json": (64, 48)}


def test_every_shipped_workflow_has_a_small_run():
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == sorted(SMALL)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir()
    (root / "input").mkdir()
    config = load_checkpoint(EMBEDDED_PATH, device="cpu").config  # every workflow runs on the embedded model
    save_lora(random_lora(config, style="kohya", rank=4, alpha=4.0, seed=2, scale=0.05),
              root / "models" / "loras" / "demo_lora.safetensors")
    gen = torch.Generator().manual_seed(0)
    picture = torch.rand(1, 50, 75, 3, generator=gen)
    to_pil(picture).save(root / "input" / "example.png")  # cropped to 48×72
    # the same picture 48×72 with a transparent hole (LoadImage's MASK = 1 − alpha), as the mask editor saves it
    alpha = torch.full((48, 72), 255, dtype=torch.uint8)
    alpha[16:40, 24:56] = 0
    rgba = torch.cat([(picture[0, :48, :72] * 255).round().to(torch.uint8), alpha[..., None]], dim=-1)
    Image.fromarray(rgba.numpy(), "RGBA").save(root / "input" / "example_mask.png")
    return root


def _run(dirs: Path, workflow: Path, *extra: str, out: str = "output") -> int:
    return ldm_run([str(workflow), "--models-dir", str(dirs / "models"), "--input-dir", str(dirs / "input"),
                    "--output-dir", str(dirs / out), "--quiet", *extra])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_workflow_runs_headless_and_embeds_itself(dirs, name, capsys):
    out = f"out_{name}"
    sets = [a for s in SMALL[name] for a in ("--set", s)]
    assert _run(dirs, WORKFLOWS / name, *sets, "--json", out=out) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and len(summary["images"]) == 1
    img = Image.open(summary["images"][0])
    assert img.size == EXPECTED_SIZE[name]
    prompt = json.loads(img.text["prompt"])
    assert any(n["class_type"] in ("VAEDecode", "LDMVAEDecode", "LDMVAEDecodeTiled") for n in prompt.values())
    if name.endswith("_ui.json"):  # the editor's format is embedded too, so dragging the PNG restores the graph
        assert json.loads(img.text["workflow"])["nodes"]
    # the PNG itself re-runs
    assert _run(dirs, Path(summary["images"][0]), out=out + "_again") == 0


def _small_png(dirs: Path, name: str, out: str, *extra: str) -> Path:
    sets = [a for s in [*SMALL[name], *extra] for a in ("--set", s)]
    assert _run(dirs, WORKFLOWS / name, *sets, out=out) == 0
    (png,) = (dirs / out).glob("*.png")
    return png


def test_inpaint_mask_workflow_keeps_every_pixel_outside_the_mask(dirs):
    """inpaint_mask.json: mask from the PNG's alpha (hole rows 16..39, columns 24..55), grown by 4 px;
    outside it the saved picture is the input's pixels exactly, inside it is repainted."""
    result = torch.from_numpy(np.array(Image.open(_small_png(dirs, "inpaint_mask.json", "inpaint_keep")))).int()
    source = torch.from_numpy(np.array(Image.open(dirs / "input" / "example_mask.png").convert("RGB"))).int()
    outside = torch.ones(48, 72, dtype=torch.bool)
    outside[12:44, 20:60] = False  # the hole grown by 4 px on each side
    assert torch.equal(result[outside], source[outside])
    repainted = (result[16:40, 24:56] - source[16:40, 24:56]).abs().float().mean()
    print(f"inpaint_mask: mean |Δ| in the hole {float(repainted):.1f} / 255")
    assert repainted > 5, repainted


def test_lora_workflow_changes_the_image_and_strength_zero_equals_no_lora(dirs, tmp_path):
    with_lora = Image.open(_small_png(dirs, "lora.json", "lora_on")).tobytes()
    without = Image.open(_small_png(dirs, "lora.json", "lora_off", "2.strength_model=0", "2.strength_clip=0")).tobytes()
    graph = json.loads((WORKFLOWS / "lora.json").read_text())  # the same graph with the LoRA node bypassed
    del graph["2"]
    graph["3"]["inputs"]["clip"] = graph["4"]["inputs"]["clip"] = ["1", 1]
    graph["6"]["inputs"]["model"] = ["1", 0]
    plain = tmp_path / "lora.json"
    plain.write_text(json.dumps(graph))
    sets = [a for s in SMALL["lora.json"] for a in ("--set", s)]
    assert _run(dirs, plain, *sets, out="lora_plain") == 0
    (png,) = (dirs / "lora_plain").glob("*.png")
    assert with_lora != without and Image.open(png).tobytes() == without


def test_same_graph_and_seed_give_identical_png_bytes(dirs):
    sets = [a for s in SMALL["txt2img.json"] for a in ("--set", s)]
    assert _run(dirs, WORKFLOWS / "txt2img.json", *sets, out="det_a") == 0
    assert _run(dirs, WORKFLOWS / "txt2img.json", *sets, out="det_b") == 0
    a = (dirs / "det_a" / "txt2img_00001_.png").read_bytes()
    b = (dirs / "det_b" / "txt2img_00001_.png").read_bytes()
    assert a == b


def test_batch_seeds_and_no_overwrite(dirs, capsys):
    sets = [a for s in SMALL["txt2img.json"] for a in ("--set", s)]
    assert _run(dirs, WORKFLOWS / "txt2img.json", *sets, "--seed", "5", "--batch-seeds", "2", "--json", out="seeds") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = sorted(Path(p).name for p in summary["images"])
    assert names == ["txt2img_00001_.png", "txt2img_00002_.png"]
    a, b = (Image.open(p).tobytes() for p in summary["images"])
    assert a != b  # different seeds


def test_prefix_escaping_output_dir_is_refused_and_nothing_written(dirs, tmp_path):
    sets = [a for s in SMALL["txt2img.json"] for a in ("--set", s)]
    code = _run(dirs, WORKFLOWS / "txt2img.json", *sets, "--set", '7.filename_prefix="../../escape"', out="esc")
    assert code == 1
    assert not list(dirs.glob("**/escape*"))


def test_validation_report_and_exit_code(dirs, capsys, tmp_path):
    bad = json.loads((WORKFLOWS / "txt2img.json").read_text())
    bad["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    bad["5"]["inputs"]["steps"] = 0
    bad["6"]["class_type"] = "NoSuchNode"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    assert _run(dirs, p) == 1
    err = capsys.readouterr().err
    for code in ("value_not_in_list", "value_out_of_range", "unknown_node_type"):
        assert code in err


def test_node_contract_of_every_pack_node():
    classes, names = node_mappings(pack_specs(), context_factory=lambda: None)
    assert classes and set(classes) == set(names)
    for node_id, cls in classes.items():
        assert node_id.startswith("LDM"), node_id
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"} and "required" in types
        for section in ("required", "optional"):
            for name, value in types.get(section, {}).items():
                assert isinstance(value, tuple) and len(value) == 2, (node_id, name)
                assert isinstance(value[0], (str, list)) and isinstance(value[1], dict), (node_id, name)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY.startswith("ldm/") and isinstance(cls.OUTPUT_NODE, bool)
        assert cls.DESCRIPTION


def test_core_table_keeps_comfyui_input_order():
    reg = headless_registry()
    for core_id, (_, _, _, names) in CORE_NODES.items():
        assert tuple(i.name for i in reg[core_id].inputs) == names, core_id
    assert reg["KSampler"].input("model").type == "MODEL"
    assert reg["LDMKSampler"].input("model").type == "LDM_MODEL"


def _pack_copy(tmp_path: Path) -> Path:
    pack = tmp_path / "custom_nodes" / "ldm-pack-under-test"
    pack.parent.mkdir()
    shutil.copytree(ROOT, pack, ignore=shutil.ignore_patterns(".git", ".venv", ".ci-venv", "__pycache__", "output",
                                                              ".pytest_cache", ".hypothesis", "*.egg-info"))
    return pack


def test_pack_loads_like_comfyui_loads_it(tmp_path):
    """Imported as a package from a folder whose name has dashes, while a foreign top-level
    `nodes` module (ComfyUI's) is already imported: nothing shadowed, sys.path untouched, the
    engine and the nodes mounted under their one names from the pack's own folder, every node
    registered."""
    pack = _pack_copy(tmp_path)
    script = textwrap.dedent(f"""
        import importlib.util, sys, types
        foreign = types.ModuleType("nodes"); foreign.MARK = "comfy"; sys.modules["nodes"] = foreign
        path = {str(pack / "__init__.py")!r}
        spec = importlib.util.spec_from_file_location("ldm-pack-under-test", path,
                                                      submodule_search_locations=[{str(pack)!r}])
        path_before = list(sys.path)
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
        assert sys.modules["nodes"] is foreign, "the pack replaced ComfyUI's nodes module"
        assert "folder_paths" not in sys.modules and "comfy" not in sys.modules
        assert sys.path == path_before, "the pack changed sys.path"
        for name, folder in (("ldm_core", "ldm_core"), ("ldm_nodes", "nodes")):
            where = sys.modules[name].__file__
            assert where.startswith({str(pack)!r} + "/" + folder + "/"), (name, where)
        m = mod.NODE_CLASS_MAPPINGS
        assert len(m) >= 15 and all(k.startswith("LDM") for k in m), sorted(m)
        for cls in m.values():
            cls.INPUT_TYPES()
        print(len(m))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_second_copy_of_the_engine_is_refused_by_name(tmp_path):
    """With another `ldm_core` already imported (an installed copy, another pack folder), the pack
    registers nothing and says which two copies collide, instead of mixing their modules."""
    pack = _pack_copy(tmp_path)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import ldm_core  # the installed copy, from this checkout
        spec = importlib.util.spec_from_file_location("ldm-pack-under-test", {str(pack / "__init__.py")!r},
                                                      submodule_search_locations=[{str(pack)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
        assert mod.NODE_CLASS_MAPPINGS == {{}}
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "another copy of ldm_core is already imported from" in res.stderr, res.stderr[-3000:]
    assert str(pack / "ldm_core") in res.stderr


def test_symlinked_model_files_load_but_names_cannot_climb_out(dirs, tmp_path):
    from ldm_nodes.context import NodeContext, PathError

    elsewhere = tmp_path / "disk2" / "real.safetensors"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "linked.safetensors").symlink_to(elsewhere)
    ctx = NodeContext.headless(models)
    assert "linked.safetensors" in ctx.list_models("checkpoints")
    assert ctx.model_path("checkpoints", "linked.safetensors").read_bytes() == b"x"
    for bad in ("../disk2/real.safetensors", str(elsewhere), "a/../../x.safetensors"):
        with pytest.raises(PathError, match="outside"):
            ctx.model_path("checkpoints", bad)


def test_extra_model_paths_yaml(tmp_path):
    from ldm_nodes.context import NodeContext

    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    (a1111 / "models" / "Stable-diffusion" / "a.safetensors").write_bytes(b"")
    (a1111 / "models" / "Lora").mkdir(parents=True)
    (a1111 / "models" / "LyCORIS").mkdir(parents=True)
    (a1111 / "models" / "LyCORIS" / "l.safetensors").write_bytes(b"")
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(
        "a111:\n"
        "    base_path: webui/\n"
        "    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n"
        "         models/Lora\n"
        "         models/LyCORIS\n"
        "    upscale_models: models/ESRGAN\n"
    )
    ctx = NodeContext.headless(None, extra_paths=yaml_file)
    assert ctx.list_models("checkpoints") == ["a.safetensors", "ldm-scenes.safetensors"]  # + the embedded model
    assert ctx.list_models("loras") == ["l.safetensors"]
    assert ctx.model_path("checkpoints", "a.safetensors") == a1111 / "models" / "Stable-diffusion" / "a.safetensors"


def test_readme_lists_every_core_node_that_runs_headless():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Core nodes that run headless", 1)[1].split("##", 1)[0]
    listed = set(re.findall(r"`(\w+)`", section)) - {"CORE_NODES"}
    assert listed == set(CORE_NODES), (sorted(set(CORE_NODES) - listed), sorted(listed - set(CORE_NODES)))
    assert f"{len(CORE_NODES)} ComfyUI core ids" in section


def test_empty_latent_follows_a_connected_vae():
    """Unconnected: ComfyUI's 4 channels at 1/8; with the embedded f = 4 VAE: 1/4."""
    from ldm_nodes.latent_nodes import empty

    vae = load_checkpoint(EMBEDDED_PATH, device="cpu").vae
    assert empty(None, 64, 48)[0]["samples"].shape == (1, 4, 6, 8)
    assert empty(None, 64, 48, 2, vae)[0]["samples"].shape == (2, 4, 12, 16)
