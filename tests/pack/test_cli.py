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
    assert rest.strip().splitlines()[-1] == "ldm-run: terminated"
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
