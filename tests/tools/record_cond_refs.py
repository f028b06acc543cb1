"""Record ComfyUI's regional-conditioning results as fixtures for tests/sampling/test_guidance.py and
tests/conditioning/test_cond.py.

Runs ComfyUI's own sampling_function (calc_cond_batch with areas, feathering, masks, mask
bounds, timestep ranges, area pairing, c_concat cropping, CFG) and its Conditioning* node
functions on a toy model whose output depends on its inputs in a fixed, known way, and
saves inputs and outputs to tests/data/cond_*.safetensors. The toy model is restated in the
tests, so the engine is compared on identical inputs.

Run with ComfyUI's interpreter, from its checkout (ComfyUI v0.3.64, commit
637221995f7424a561bd825de3e61ea117dfe1e3):

    cd /tmp/comfy_probe/ComfyUI && /tmp/comfy_probe/venv/bin/python \\
        /work/main/tests/tools/record_cond_refs.py comfy /work/main/tests/data

The layout encoder reference (cond_layout_ref.safetensors) comes from the original LDM
code instead: the `TransformerWrapper(attn_layers=Encoder(...))` of BERTEmbedder in
CompVis/latent-diffusion (commit a506df5756472e2ebaf9078affdde2c4f1502cd4,
ldm/modules/x_transformer.py, needs einops), loaded strictly with the weights of our
`random_layout_encoder` and run on fixed tokens. From the repository root:

    .venv/bin/python tests/tools/record_cond_refs.py layout tests/data /path/to/x_transformer.py
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

comfy = None  # ComfyUI's package, imported by import_comfy() when recording its references


def import_comfy() -> None:
    global comfy
    sys.path.insert(0, ".")
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.conds
    import comfy.model_sampling
    import comfy.samplers

    globals()["comfy"] = sys.modules["comfy"]

COMFY_COMMIT = "637221995f7424a561bd825de3e61ea117dfe1e3"
D = 8  # context width of the toy model


def toy_x0(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, concat: torch.Tensor | None) -> torch.Tensor:
    """The toy denoiser the tests restate: 0.5·x + mean over tokens of context[..., :C]
    + 0.01·σ + (mean over channels of concat, if any)."""
    c = x.shape[1]
    out = 0.5 * x + context.mean(dim=1)[:, :c, None, None] + 0.01 * sigma.reshape(-1, 1, 1, 1)
    if concat is not None:
        out = out + concat.mean(dim=1, keepdim=True)
    return out


class _Patcher:
    def prepare_state(self, timestep):
        pass

    def apply_hooks(self, hooks=None, **kw):
        return {}


class ToyModel:
    def __init__(self):
        self.current_patcher = _Patcher()
        self.model_sampling = comfy.model_sampling.ModelSamplingDiscrete()  # SD's scaled-linear schedule

    def memory_required(self, input_shape, cond_shapes=None):
        return 0

    def apply_model(self, x, t, c_crossattn=None, c_concat=None, transformer_options=None, **kw):
        return toy_x0(x, t, c_crossattn, c_concat)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Scenarios: entries name tensors stored in the fixture. area: [h, w, y, x] latent cells or
# ["percentage", h, w, y, x]; mask: tensor name; bounds: set_cond_area "mask bounds".
SCENARIOS = {
    "areas": {
        "x": [1, 4, 24, 24], "cfg": 7.5, "sigmas": [5.0],
        "positive": [
            {"ctx": 77},
            {"ctx": 77, "area": [12, 16, 4, 6], "strength": 1.5},
            {"ctx": 154, "area": ["percentage", 0.5, 0.5, 0.5, 0.5], "strength": 0.8},
            {"ctx": 77, "area": [16, 16, 16, 16]},  # runs past the latent: clamped to 8×8
        ],
        "negative": [{"ctx": 77}],
    },
    "masks": {
        "x": [2, 4, 16, 16], "cfg": 4.0, "sigmas": [3.0],
        "positive": [
            {"ctx": 77, "strength": 0.5},
            {"ctx": 77, "mask": [1, 40, 40], "mask_strength": 0.7},
            {"ctx": 77, "mask": "blob", "bounds": True, "strength": 1.3},
            {"ctx": 77, "mask": [2, 16, 16], "mask_strength": 1.0, "area": [8, 8, 8, 4]},
        ],
        "negative": [{"ctx": 77}, {"ctx": 77, "area": [10, 10, 2, 2], "strength": 0.9}],
    },
    "timesteps": {
        "x": [1, 4, 12, 12], "cfg": 5.0, "sigmas": [14.6146, 5.0, "p0.5", 1.0, "p0.8", 0.3, 0.0292],
        "positive": [
            {"ctx": 77, "start": 0.0, "end": 0.5},
            {"ctx": 77, "start": 0.3, "end": 1.0, "strength": 2.0},
            {"ctx": 77, "area": [6, 6, 3, 3], "start": 0.5, "end": 0.8},
        ],
        "negative": [{"ctx": 77}, {"ctx": 77, "start": 0.6, "end": 1.0}],
    },
    "concat": {
        "x": [2, 4, 16, 16], "cfg": 3.0, "sigmas": [2.0],
        "positive": [
            {"ctx": 77, "concat": [1, 5, 16, 16]},
            {"ctx": 77, "concat": [2, 5, 16, 16], "area": [8, 12, 6, 2], "strength": 1.2},
        ],
        "negative": [{"ctx": 77, "concat": [1, 5, 16, 16]}],
    },
    "cfg_one": {
        "x": [1, 4, 16, 16], "cfg": 1.0, "sigmas": [1.5],
        "positive": [{"ctx": 77}, {"ctx": 231, "area": [8, 8, 0, 8], "strength": 3.0}],
        "negative": [{"ctx": 77, "area": [8, 16, 8, 0]}],
    },
}


def _blob() -> torch.Tensor:
    """A 1×48×48 mask with a soft disc off-centre (its bounds are not the whole latent)."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    return ((1.2 - ((yy - 30) ** 2 + (xx - 14) ** 2).sqrt() / 10).clamp(0, 1))[None]


def build(name: str, spec: dict, tensors: dict, seed: int) -> list[list[dict]]:
    g = _gen(seed)
    tensors[f"{name}.x"] = torch.randn(spec["x"], generator=g)
    sides = []
    for side in ("positive", "negative"):
        conds = []
        for i, e in enumerate(spec[side]):
            key = f"{name}.{side}.{i}"
            ctx = torch.randn(1, e["ctx"], D, generator=g)
            tensors[f"{key}.ctx"] = ctx
            c = {"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(ctx)}, "uuid": uuid.uuid4()}
            if "strength" in e:
                c["strength"] = e["strength"]
            if "area" in e:
                c["area"] = tuple(e["area"])
            if "mask" in e:
                mask = _blob() if e["mask"] == "blob" else torch.rand(e["mask"], generator=g)
                tensors[f"{key}.mask"] = mask
                c["mask"] = mask
                c["mask_strength"] = e.get("mask_strength", 1.0)
                c["set_area_to_bounds"] = e.get("bounds", False)
            if "start" in e:
                c["start_percent"], c["end_percent"] = e["start"], e["end"]
            if "concat" in e:
                cc = torch.randn(e["concat"], generator=g)
                tensors[f"{key}.concat"] = cc
                c["model_conds"]["c_concat"] = comfy.conds.CONDNoiseShape(cc)
            conds.append(c)
        sides.append(conds)
    return sides


def record_guidance(out_dir: Path, model: ToyModel) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for seed, (name, spec) in enumerate(SCENARIOS.items()):
        positive, negative = build(name, spec, tensors, seed)
        x = tensors[f"{name}.x"]
        conds = comfy.samplers.process_conds(model, x, {"positive": positive, "negative": negative}, "cpu")
        sigmas = [model.model_sampling.percent_to_sigma(float(s[1:])) if isinstance(s, str) else s
                  for s in spec["sigmas"]]
        tensors[f"{name}.sigmas"] = torch.tensor(sigmas, dtype=torch.float32)
        outs = []
        for s in tensors[f"{name}.sigmas"]:
            sigma = s.reshape(1).repeat(x.shape[0])
            outs.append(comfy.samplers.sampling_function(model, x, sigma, conds["negative"], conds["positive"],
                                                         spec["cfg"], model_options={}))
        tensors[f"{name}.out"] = torch.stack(outs)
    meta = {"comfyui_commit": COMFY_COMMIT, "context_dim": str(D), "scenarios": json.dumps(SCENARIOS)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "cond_guidance_refs.safetensors"), meta)


def record_nodes(out_dir: Path) -> None:
    import nodes  # ComfyUI's nodes.py (run from its checkout)

    g = _gen(100)
    t = {
        "to77": torch.randn(1, 77, D, generator=g), "to154": torch.randn(1, 154, D, generator=g),
        "from77": torch.randn(1, 77, D, generator=g), "from154": torch.randn(1, 154, D, generator=g),
        "pool_to": torch.randn(1, 6, generator=g), "pool_from": torch.randn(1, 6, generator=g),
    }
    avg = nodes.ConditioningAverage().addWeighted
    t["avg_cut"] = avg([[t["to77"], {"pooled_output": t["pool_to"]}]],
                       [[t["from154"], {"pooled_output": t["pool_from"]}]], 0.3)[0][0][0]
    t["avg_cut_pooled"] = avg([[t["to77"], {"pooled_output": t["pool_to"]}]],
                              [[t["from154"], {"pooled_output": t["pool_from"]}]], 0.3)[0][0][1]["pooled_output"]
    padded = avg([[t["to154"], {}]], [[t["from77"], {"pooled_output": t["pool_from"]}]], 0.65)[0][0]
    t["avg_pad"], t["avg_pad_pooled"] = padded[0], padded[1]["pooled_output"]
    t["concat"] = nodes.ConditioningConcat().concat([[t["to77"], {}]], [[t["from154"], {}], [t["from77"], {}]])[0][0][0]
    save_file({k: v.contiguous() for k, v in t.items()}, str(out_dir / "cond_node_refs.safetensors"),
              {"comfyui_commit": COMFY_COMMIT})


LAYOUT_CONFIG = {"vocab_size": 101, "num_classes": 20, "max_objects": 4, "max_seq_len": 14, "dim": 32,
                 "depth": 2, "heads": 2, "dim_head": 8, "ff_mult": 4}
LAYOUT_OBJECTS = [[[3, [0.1, 0.2, 0.5, 0.6]], [17, [0.0, 0.0, 1.0, 1.0]]], [[0, [0.25, 0.5, 0.75, 0.95]]]]


def record_layout(out_dir: Path, x_transformer: Path) -> None:
    import importlib.util

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from ldm_core.conditioning.layout import LayoutEncoderConfig, random_layout_encoder, tokenize_layout

    spec = importlib.util.spec_from_file_location("x_transformer", x_transformer)
    xt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xt)
    c = LayoutEncoderConfig(**LAYOUT_CONFIG)
    layers = xt.Encoder(dim=c.dim, depth=c.depth, heads=c.heads, attn_dim_head=c.dim_head)
    ref = xt.TransformerWrapper(num_tokens=c.vocab_size, max_seq_len=c.max_seq_len, attn_layers=layers)
    ours = random_layout_encoder(c, seed=5)
    ref.load_state_dict(ours.transformer.state_dict(), strict=True)  # same key layout, or this raises
    tokens = torch.stack([tokenize_layout(c, [(k, tuple(b)) for k, b in objs]) for objs in LAYOUT_OBJECTS])
    with torch.no_grad():
        out = ref.eval()(tokens, return_embeddings=True)
    save_file({"tokens": tokens, "context": out.contiguous()}, str(out_dir / "cond_layout_ref.safetensors"),
              {"source": "CompVis/latent-diffusion a506df5756472e2ebaf9078affdde2c4f1502cd4 "
                         "ldm/modules/x_transformer.py",
               "config": json.dumps(LAYOUT_CONFIG), "objects": json.dumps(LAYOUT_OBJECTS), "seed": "5"})


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "comfy"
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/data")
    if mode == "comfy":
        import_comfy()
        record_guidance(target, ToyModel())
        record_nodes(target)
    elif mode == "layout":
        record_layout(target, Path(sys.argv[3]))
    else:
        raise SystemExit("usage: record_cond_refs.py comfy|layout OUT_DIR [x_transformer.py]")
    print("wrote", sorted(p.name for p in target.glob("cond_*")))
