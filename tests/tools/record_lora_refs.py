"""Record ComfyUI's LoRA key maps (lora name -> model weight key) for SD1.5, SD2 and SDXL,
and the weights ComfyUI's own patch math gives for small LoRA / LoCon / LoHa / LoKr / diff layers.

Run with ComfyUI's own interpreter (ComfyUI v0.3.64, commit
637221995f7424a561bd825de3e61ea117dfe1e3), from the repository root:

    /tmp/comfy_probe/venv/bin/python tests/tools/record_lora_refs.py /tmp/comfy_probe/ComfyUI

Every model is built on the meta device (no weights, no memory). The UNet layout comes
from our own `UNetModel` key list, run through ComfyUI's detection, so both sides describe
the same architecture. Writes tests/data/lora_comfy_keys_<family>.json.gz: a sorted
list of [lora name, ComfyUI weight key] pairs from `comfy.lora.model_lora_keys_unet`
and `model_lora_keys_clip`. Writes tests/data/lora_comfy_patch_refs.safetensors: seeded
weights (`weight/<name>`), LoRA tensors (`lora/<file key>`) and what `comfy.lora.load_lora`
+ `calculate_weight` make of them (`out/<name>`, strength 0.7). CI never runs this; tests
read the fixtures.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "637221995f7424a561bd825de3e61ea117dfe1e3"


def main(comfy_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its command line on import
    sys.path.insert(1, str(ROOT))
    import comfy.options
    import torch
    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.model_detection
    from comfy import sd1_clip, sdxl_clip
    from comfy.text_encoders import sd2_clip

    from ldm_core.networks.presets import PRESETS
    from ldm_core.networks.unet import UNetModel

    clips = {"sd1": sd1_clip.SD1ClipModel, "sd2": sd2_clip.SD2ClipModel, "sdxl": sdxl_clip.SDXLClipModel}
    for family, clip_type in clips.items():
        with torch.device("meta"):
            sd = {"model.diffusion_model." + k: v for k, v in UNetModel(PRESETS[family].unet).state_dict().items()}
        config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        model = config.get_model({}, "model.diffusion_model.", device=torch.device("meta"))  # {}: no v-pred probe
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        clip = clip_type(device=torch.device("meta"))
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
        pairs = sorted([k, v if isinstance(v, str) else list(v)] for k, v in key_map.items())
        out = ROOT / "tests" / "data" / f"lora_comfy_keys_{family}.json.gz"
        payload = {"comfyui_commit": COMMIT, "model_config": type(config).__name__, "pairs": pairs}
        text = json.dumps(payload, separators=(",", ":")).encode()
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            f.write(text)  # mtime=0: the same map gives the same bytes
        print(family, type(config).__name__, len(pairs), out.stat().st_size)
    record_patch_math(ROOT)


def record_patch_math(root: Path) -> None:
    import comfy.lora
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    weights = {"lin": r(6, 5), "conv": r(4, 5, 3, 3), "mid": r(4, 5, 3, 3), "loha": r(6, 5), "lokr": r(6, 4),
               "lokr_conv": r(4, 6, 3, 3), "diff": r(3, 4)}
    lora = {
        "lin.lora_up.weight": r(6, 3), "lin.lora_down.weight": r(3, 5), "lin.alpha": torch.tensor(1.5),
        "conv.lora_up.weight": r(4, 2, 1, 1), "conv.lora_down.weight": r(2, 5, 3, 3), "conv.alpha": torch.tensor(4.0),
        "mid.lora_up.weight": r(4, 3, 1, 1), "mid.lora_down.weight": r(3, 5, 1, 1), "mid.lora_mid.weight": r(3, 3, 3, 3),
        "mid.alpha": torch.tensor(2.0),
        "loha.hada_w1_a": r(6, 2), "loha.hada_w1_b": r(2, 5), "loha.hada_w2_a": r(6, 2), "loha.hada_w2_b": r(2, 5),
        "loha.alpha": torch.tensor(1.0),
        "lokr.lokr_w1": r(2, 2), "lokr.lokr_w2_a": r(3, 1), "lokr.lokr_w2_b": r(1, 2), "lokr.alpha": torch.tensor(3.0),
        "lokr_conv.lokr_w1": r(2, 2), "lokr_conv.lokr_w2": r(2, 3, 3, 3),
        "diff.diff": r(3, 4), "diff.diff_b": r(3),
    }
    key_map = {name: f"{name}.weight" for name in weights}
    patches = comfy.lora.load_lora(lora, key_map)
    out = {f"weight/{n}": w for n, w in weights.items()} | {f"lora/{k}": v for k, v in lora.items()}
    for name, w in weights.items():
        patch = patches[f"{name}.weight"]
        out[f"out/{name}"] = comfy.lora.calculate_weight([(0.7, patch, 1.0, None, None)], w.clone(), name)
    out["out/diff_b"] = comfy.lora.calculate_weight([(0.7, patches["diff.bias"], 1.0, None, None)],
                                                    torch.zeros(3), "diff.bias")
    path = root / "tests" / "data" / "lora_comfy_patch_refs.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata={"comfyui_commit": COMMIT})
    print(path, path.stat().st_size)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/comfy_probe/ComfyUI")
