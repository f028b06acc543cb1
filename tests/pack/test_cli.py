"""ldm-run's answers to a user's mistakes and habits (issue 27, part): a misspelt --set input is an
error naming the right one, --batch-seeds alone walks on from the graph's own seeds, Ctrl-C is one
line and exit 130, --help answers without importing torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm_core.device import WEIGHT_DTYPES
from ldm_nodes import cli
from ldm_nodes.cli import main as ldm_run

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "txt2img.json"


def test_help_answers_before_torch_is_imported():
    code = ("import sys\nfrom ldm_nodes import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nassert 'torch' not in sys.modules, 'torch imported for --help'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--weight-dtype" in res.stdout and "--ram-budget" in res.stdout
    assert cli.WEIGHT_DTYPES == WEIGHT_DTYPES


@pytest.mark.parametrize("item,expected", [
    ("5.stpes=30", "node 5 (LDMKSampler) has no input 'stpes'; did you mean 'steps'?"),
    ("2.txt=a cat", "node 2 (LDMTextEncode) has no input 'txt'; did you mean 'text'?"),
])
def test_a_misspelt_set_input_is_an_error_that_names_the_right_one(item, expected, tmp_path):
    with pytest.raises(SystemExit) as e:
        ldm_run([str(WORKFLOW), "--set", item, "--output-dir", str(tmp_path), "--quiet"])
    assert expected in str(e.value)
    assert not list(tmp_path.glob("*.png"))


def test_batch_seeds_without_seed_walks_on_from_the_graphs_seed(tmp_path, capsys):
    rc = ldm_run([str(WORKFLOW), "--batch-seeds", "2", "--set", "5.steps=2", "--output-dir", str(tmp_path), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(set(summary["images"])) == 2  # two files, not one path twice
    seeds = [json.loads(Image.open(p).text["prompt"])["5"]["inputs"]["seed"] for p in summary["images"]]
    graph_seed = json.loads(WORKFLOW.read_text())["5"]["inputs"]["seed"]
    assert seeds == [graph_seed, graph_seed + 1]


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args, budget):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert ldm_run([str(WORKFLOW)]) == 130
    assert capsys.readouterr().err.strip() == "ldm-run: interrupted"


def test_a_prefix_that_leaves_the_output_folder_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from ldm_core.loading import loader

    def never(*a, **k):
        raise AssertionError("a model was loaded before the prefix was checked")

    monkeypatch.setattr(loader, "load_checkpoint", never)
    out = tmp_path / "out"
    rc = ldm_run([str(WORKFLOW), "--set", "7.filename_prefix=../../escaped", "--output-dir", str(out), "--quiet"])
    assert rc == 1
    assert not out.exists() and not list(tmp_path.rglob("escaped*"))


def test_a_non_finite_prompt_weight_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    from ldm_core.loading import loader

    monkeypatch.setattr(loader, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = ldm_run([str(WORKFLOW), "--set", "2.text=a (red:nan) circle", "--output-dir", str(tmp_path), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "node 2" in err and "'(red:nan)' is not a finite number" in err and "(red:1.2)" in err, err


def test_saved_pictures_get_the_usual_file_mode(tmp_path):
    import os

    from ldm_core.imaging.image_io import write_png_atomic

    old = os.umask(0o022)
    try:
        path = write_png_atomic(Image.new("RGB", (2, 2)), tmp_path / "x.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".tmp-*"))


def test_sigterm_stops_cleanly_with_nothing_partial_on_disk(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ldm_nodes.cli", str(WORKFLOW), "--output-dir", str(tmp_path),
                             "--set", "5.steps=200"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until the sampler runs
        if "[5]" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    assert "ldm-run: terminated" in rest.splitlines()  # one line of its own (a progress bar may redraw after it)
    assert "Traceback" not in rest
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("name", ["txt2img.json", "img2img.json", "inpaint.json", "inpaint_mask.json"])
def test_shipped_workflows_run_from_an_empty_directory_with_no_flags(name, tmp_path):
    """The example pictures ship with the pack (nodes/examples/), found when input/ has none."""
    res = subprocess.run([sys.executable, "-m", "ldm_nodes.cli", str(WORKFLOW.parent / name), "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    written = list((tmp_path / "output").glob("*.png"))
    assert len(written) == 1 and Image.open(written[0]).size[0] >= 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]  # nothing else created


def test_hostile_inputs_get_messages_not_tracebacks(tmp_path, capsys):
    """Each found by a probe (issue 27): a 5,000-digit --set integer, a missing or malformed
    --extra-model-paths file, a UTF-16 workflow, a PNG renamed .json, a file named like JSON."""
    graph = json.loads(WORKFLOW.read_text())
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps(graph).encode("utf-16"))
    bracketed = tmp_path / "[draft] {v2}.json"
    bracketed.write_text(json.dumps(graph))
    renamed = tmp_path / "picture.json"
    Image.new("RGB", (4, 4)).save(renamed, format="PNG")
    bad_yaml = tmp_path / "extra.yaml"
    bad_yaml.write_text("a: [unclosed\n")
    out = tmp_path / "out"
    common = ["--output-dir", str(out), "--quiet", "--set", "5.steps=1"]
    cases = [
        ([str(WORKFLOW), "--set", "5.seed=" + "9" * 5000, "--output-dir", str(out), "--quiet"], 1, "seed"),
        ([str(WORKFLOW), "--extra-model-paths", str(tmp_path / "missing.yaml"), *common], 2, "missing.yaml"),
        ([str(WORKFLOW), "--extra-model-paths", str(bad_yaml), *common], 2, "cannot read it as an extra_model_paths"),
        ([str(renamed), *common], 1, "carries no workflow"),
    ]
    for argv, rc, text in cases:
        assert ldm_run(argv) == rc, argv[:3]
        assert text in capsys.readouterr().err
    for path in (utf16, bracketed):  # both are the txt2img graph and run
        assert ldm_run([str(path), *common]) == 0, path
    assert len(list(out.glob("*.png"))) == 2


def test_a_corrupt_header_entry_is_quoted_short(tmp_path):
    import struct

    from ldm_core.checkpoints.weights_file import read_weights
    from ldm_core.errors import CheckpointFormatError

    header = json.dumps({"w": {"dtype": "F32", "shape": "x" * 1_000_000, "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointFormatError) as e:
        read_weights(path)
    assert len(str(e.value)) < 400 and "characters)" in str(e.value)


def test_a_symlinked_temp_folder_cannot_send_previews_outside(tmp_path):
    from ldm_nodes.context import NodeContext, PathError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "output"
    out.mkdir()
    (out / ".temp").symlink_to(outside, target_is_directory=True)
    ctx = NodeContext.headless(output_dir=out)
    with pytest.raises(PathError, match="leads outside the output folder"):
        ctx.output_folder("", temp=True)
    assert ctx.output_folder("", temp=False).resolve() == out.resolve()
    assert not list(outside.iterdir())


def test_an_animated_png_too_large_to_decode_is_refused_before_decoding(tmp_path):
    from ldm_core.errors import MemoryBudgetError
    from ldm_core.imaging import image_io

    frames = [Image.new("RGB", (300, 200), (i, 0, 0)) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as img:
        with pytest.raises(MemoryBudgetError, match=r"3 frame\(s\) of 300×200"):
            image_io._check_decoded_size(img, "anim.png", available=1_000_000)
        image_io._check_decoded_size(img, "anim.png", available=10**9)  # fits: no error
    images, _ = image_io.load_image(path)
    assert images.shape == (3, 200, 300, 3)


def test_a_latent_beyond_the_machine_is_refused_before_allocating():
    from ldm_core.errors import MemoryBudgetError
    from ldm_core.imaging import latent

    with pytest.raises(MemoryBudgetError, match=r"a latent of 4096 × 16384×16384 needs .* GiB"):
        latent.empty(16384, 16384, 4096)
    assert latent.empty(64, 64, 1, 4, 4).shape == (1, 4, 16, 16)


def test_progress_says_which_node_of_how_many(tmp_path, capsys):
    assert ldm_run([str(WORKFLOW), "--set", "5.steps=2", "--output-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "[1] LDMCheckpointLoader  (node 1 of 7," in err and "(node 7 of 7," in err, err


def test_a_stale_temp_file_from_a_killed_run_is_removed_at_the_next_save(tmp_path):
    import os
    import time

    import torch

    from ldm_core.imaging.image_io import save_images

    stale, fresh = tmp_path / ".tmp-abc.png", tmp_path / ".tmp-def.png"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    save_images(torch.zeros(1, 8, 8, 3), tmp_path, "pic")
    assert not stale.exists() and fresh.exists()  # a young one may be another run's save in progress
    assert (tmp_path / "pic_00001_.png").exists()


def test_a_missing_file_names_the_folders_searched(tmp_path, capsys):
    lora = WORKFLOW.parent / "lora.json"
    assert ldm_run([str(lora), "--output-dir", str(tmp_path), "--quiet"]) == 1
    assert "no folder for loras files was given" in capsys.readouterr().err
    assert ldm_run([str(lora), "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path)]) == 1
    assert f"searched for loras files in {tmp_path / 'models' / 'loras'}" in capsys.readouterr().err
    assert ldm_run([str(WORKFLOW.parent / "img2img.json"), "--set", "4.image=nope.png", "--input-dir",
                    str(tmp_path / "in"), "--output-dir", str(tmp_path)]) == 1
    assert f"searched for pictures in {tmp_path / 'in'}" in capsys.readouterr().err
