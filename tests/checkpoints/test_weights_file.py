"""Weights-file reading: memory-mapped safetensors, safe pickle loading, and every bad-file case."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_core.checkpoints.weights_file import read_weights, split_components
from ldm_core.errors import CheckpointFormatError, UnsafeCheckpointError


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "f16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def test_safetensors_values_dtypes_metadata(tmp_path, tensors):
    p = tmp_path / "a.safetensors"
    save_file(tensors, str(p), metadata={"modelspec.title": "x"})
    wf = read_weights(p)
    ref = load_file(str(p))
    assert set(wf.tensors) == set(ref)
    for k in ref:
        assert wf.tensors[k].dtype == ref[k].dtype and torch.equal(wf.tensors[k], ref[k]), k
    assert wf.metadata == {"modelspec.title": "x"}


def test_safetensors_is_memory_mapped_copy_on_write(tmp_path):
    p = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(1024, 1024)}, str(p))
    wf = read_weights(p)
    assert not wf.tensors["w"].untyped_storage().resizable()  # a file mapping, not a heap buffer
    wf.tensors["w"].mul_(2)  # writes stay private to this process
    assert torch.equal(load_file(str(p))["w"], torch.ones(1024, 1024))


def test_truncated_safetensors_is_a_format_error(tmp_path, tensors):
    p = tmp_path / "t.safetensors"
    save_file(tensors, str(p))
    data = p.read_bytes()
    for cut in (4, 20, len(data) - 3):
        q = tmp_path / f"cut{cut}.safetensors"
        q.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated|too short|outside"):
            read_weights(q)


def test_corrupt_safetensors_header(tmp_path):
    p = tmp_path / "c.safetensors"
    body = b"{not json"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointFormatError, match="JSON"):
        read_weights(p)
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match="wrong byte size"):
        read_weights(p)


def test_ckpt_with_state_dict_loads(tmp_path, tensors):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, p)
    wf = read_weights(p)
    assert set(wf.tensors) == set(tensors)
    assert torch.equal(wf.tensors["f32"], tensors["f32"])


class _Payload:
    """Unpickling this would call os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload()}, p)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_weights(p)
    assert not (tmp_path / "PWNED_MARKER").exists()
    # The same payload in a legacy (non-zip) pickle file.
    q = tmp_path / "evil_legacy.pt"
    with open(q, "wb") as f:
        pickle.dump({"evil": _Payload()}, f)
    with pytest.raises((UnsafeCheckpointError, CheckpointFormatError)):
        read_weights(q)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_truncated_ckpt_is_a_format_error(tmp_path, tensors):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors}, p)
    data = p.read_bytes()
    q = tmp_path / "short.ckpt"
    q.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        read_weights(q)
    assert zipfile.is_zipfile(p)


def test_unknown_suffix_and_missing_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(CheckpointFormatError, match="unknown weights format"):
        read_weights(p)
    with pytest.raises(CheckpointFormatError, match="no such file"):
        read_weights(tmp_path / "missing.safetensors")


def test_split_components_by_prefix():
    t = torch.zeros(1)
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.loss.logvar", "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight", "alphas_cumprod", "model_ema.decay", "mystery.weight",
    ]
    c = split_components({k: t for k in keys})
    assert list(c.unet) == ["input_blocks.0.0.weight"]
    assert list(c.vae) == ["encoder.conv_in.weight"]
    assert c.text_encoders == {
        "cond_stage_model.transformer.": {"text_model.final_layer_norm.weight": t},
        "conditioner.embedders.1.model.": {"ln_final.weight": t},
    }
    assert sorted(c.ignored) == ["alphas_cumprod", "first_stage_model.loss.logvar", "model_ema.decay"]
    assert c.unknown == ["mystery.weight"]
