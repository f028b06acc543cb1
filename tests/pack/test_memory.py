"""Memory (issue 26), CI-sized: a base + refiner graph over two generated checkpoints whose sum
is more than the RAM budget runs to the same pixels as with no budget; under the budget the
first model is dropped once the second is loaded and reloaded from its file when a later run
needs it again."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.loading import footprint, loader
from ldm_core.networks.presets import PRESETS, shrink
from ldm_nodes.cli import main as ldm_run

LOAD = loader.load_checkpoint

# ComfyUI's base + refiner example, in its API format, with two SD1-layout stand-ins.
GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
    "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "refiner.safetensors"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["2", 1]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
    "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "8": {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["7", 0],
        "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}},
    "9": {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["2", 0], "add_noise": "disable", "noise_seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["8", 0],
        "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
    "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 2]}},
    "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "refined"}},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    (root / "models" / "checkpoints").mkdir(parents=True)
    cfg = shrink(PRESETS["sd1"])
    for seed, name in ((1, "base"), (2, "refiner")):
        save_checkpoint(cfg, root / "models" / "checkpoints" / f"{name}.safetensors", seed=seed)  # fp32
    (root / "graph.json").write_text(json.dumps(GRAPH))
    one = footprint.nbytes(loader.load_checkpoint(root / "models" / "checkpoints" / "base.safetensors", device="cpu"))
    return root, one


def _run(root, tag, monkeypatch, *args):
    loads: list[str] = []

    def counting(path, **kw):
        loads.append(path.name)
        return LOAD(path, **kw)

    monkeypatch.setattr(loader, "load_checkpoint", counting)
    out = root / f"out_{tag}"
    rc = ldm_run([str(root / "graph.json"), "--models-dir", str(root / "models"), "--output-dir", str(out),
                  "--device", "cpu", "--batch-seeds", "2", "--seed", "3", "--quiet", *args])
    assert rc == 0
    pictures = [np.asarray(Image.open(p)) for p in sorted(out.glob("refined_*.png"))]
    return loads, pictures


def test_two_checkpoints_over_the_budget_give_the_same_pixels_and_reload(setup, monkeypatch):
    root, one = setup
    budget = int(one * 1.5)  # one model fits, the two together do not
    assert 2 * one > budget
    free_loads, free_pictures = _run(root, "free", monkeypatch, "--ram-budget", str(100 * one))
    tight_loads, tight_pictures = _run(root, "tight", monkeypatch, "--ram-budget", str(budget))
    assert len(free_pictures) == len(tight_pictures) == 2
    for a, b in zip(free_pictures, tight_pictures):
        assert np.array_equal(a, b)
    assert not np.array_equal(free_pictures[0], free_pictures[1])  # two seeds, two pictures
    assert sorted(free_loads) == ["base.safetensors", "refiner.safetensors"]  # kept for the second run
    # under the budget: the base is dropped when the refiner comes, and both are read again in run 2
    assert sorted(tight_loads) == ["base.safetensors"] * 2 + ["refiner.safetensors"] * 2


def test_the_sizes_counted_are_the_weights(setup):
    root, one = setup
    ck = loader.load_checkpoint(root / "models" / "checkpoints" / "base.safetensors", device="cpu")
    weights = sum(p.numel() * 4 for m in (ck.model.unet, ck.vae.model, ck.text_encoder.encoders) for p in m.parameters())
    assert weights <= one <= weights * 1.01  # parameters plus a few small buffers
    half = loader.load_checkpoint(root / "models" / "checkpoints" / "base.safetensors", device="cpu",
                                  weight_dtype="fp16")
    assert abs(footprint.nbytes(half) * 2 - one) <= one * 0.01
    assert torch.equal(half.model.unet.time_embed[0].weight.float(),
                       ck.model.unet.time_embed[0].weight.half().float())


def test_a_load_that_cannot_fit_names_the_node_and_the_sizes(setup, monkeypatch, capsys):
    root, _ = setup
    monkeypatch.setattr(loader, "available_ram", lambda: 10_000)
    rc = ldm_run([str(root / "graph.json"), "--models-dir", str(root / "models"), "--output-dir",
                  str(root / "out_oom"), "--device", "cpu", "--weight-dtype", "fp16", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "CheckpointLoaderSimple" in err and "MemoryBudgetError" in err, err
    assert "GiB of RAM are available" in err and "--weight-dtype auto" in err, err
    assert not (root / "out_oom").exists() or not list((root / "out_oom").glob("*.png"))  # nothing half-written
