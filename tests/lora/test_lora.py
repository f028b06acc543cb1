"""LoRA: the patch math (known answers), the key maps (against diffusers' converter and a recorded
ComfyUI 0.3.64 key map), patching that leaves the base weights bit-identical, stacking, family
errors, and the loader nodes end to end against weights merged by hand."""
from __future__ import annotations

import copy
import functools
import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm_core.checkpoints.synthetic import save_checkpoint
from ldm_core.loading.loader import load_checkpoint
from ldm_core.loading.model import DiffusionModel, TextEncoder
from ldm_core.lora.lora_names import random_lora, save_lora, text_key_map, unet_diffusers_names, unet_key_map
from ldm_core.lora.weight_patch import (
    Full,
    LoHa,
    LoKr,
    LoraMismatchError,
    LowRank,
    WeightPatch,
    apply_lora,
    context_width,
    group_layers,
    make_adapters,
    merged_weight,
    merged_weights,
    patched,
)
from ldm_core.networks.clip_text import ClipTextEncoder, TextEncoderSet
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.networks.unet import UNetModel
from ldm_core.pipeline.jobs import ksample

DATA = Path(__file__).parents[1] / "data"
SD1 = shrink(PRESETS["sd1"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# The math, on single layers: known answers in float64.

def test_lowrank_linear_known_answer():
    g = _gen(0)
    w = torch.randn(6, 5, generator=g)
    up, down = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    patch = WeightPatch("w", LowRank(up, down, alpha=1.5), 0.7)
    expected = w.double() + 0.7 * (1.5 / 3) * (up.double() @ down.double())
    assert (merged_weight(w, [patch]).double() - expected).abs().max() < 1e-6
    no_alpha = merged_weight(w, [WeightPatch("w", LowRank(up, down), 1.0)])  # PEFT: α/r = 1
    assert (no_alpha.double() - (w.double() + up.double() @ down.double())).abs().max() < 1e-6


def test_locon_3x3_is_the_composition_of_its_two_convolutions():
    """LoCon: down is a 3×3 conv C_in→r, up a 1×1 conv r→C_out; ΔW·x must equal up(down(x))."""
    g = _gen(1)
    x = torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64)
    down, up = torch.randn(3, 5, 3, 3, generator=g), torch.randn(4, 3, 1, 1, generator=g)
    delta = LowRank(up, down, alpha=3.0).delta(torch.Size([4, 5, 3, 3]), torch.device("cpu"))
    chained = F.conv2d(F.conv2d(x, down.double(), padding=1), up.double())
    assert (F.conv2d(x, delta.double(), padding=1) - chained).abs().max() < 1e-5


def test_locon_mid_kernel_is_down_then_mid_then_up():
    g = _gen(2)
    x = torch.randn(1, 5, 6, 6, generator=g, dtype=torch.float64)
    down, mid, up = (torch.randn(3, 5, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g),
                     torch.randn(4, 3, 1, 1, generator=g))
    delta = LowRank(up, down, mid, alpha=1.5).delta(torch.Size([4, 5, 3, 3]), torch.device("cpu"))
    chained = F.conv2d(F.conv2d(F.conv2d(x, down.double()), mid.double(), padding=1), up.double()) * 0.5
    assert (F.conv2d(x, delta.double(), padding=1) - chained).abs().max() < 1e-5


def test_loha_lokr_and_diff_known_answers():
    g = _gen(3)
    shape = torch.Size([6, 4])
    cpu = torch.device("cpu")
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((6, 2), (2, 4), (6, 2), (2, 4)))
    loha = LoHa(w1a, w1b, w2a, w2b, alpha=1.0).delta(shape, cpu)
    assert torch.allclose(loha, (w1a @ w1b) * (w2a @ w2b) / 2, atol=1e-6)
    a, b, c = (torch.randn(s, generator=g) for s in ((2, 2), (3, 1), (1, 2)))  # W2 = b·c of rank 1
    assert torch.allclose(LoKr(a, (b, c), alpha=4.0).delta(shape, cpu), torch.kron(a, b @ c) * 4.0, atol=1e-6)
    assert torch.allclose(LoKr(a, b @ c).delta(shape, cpu), torch.kron(a, b @ c))  # nothing decomposed: α/r = 1
    diff = torch.randn(shape, generator=g)
    assert torch.equal(Full(diff).delta(shape, cpu), diff)


def test_patch_math_matches_comfyui():
    """LoRA (α), LoCon 3×3, LoCon with a mid kernel, LoHa, LoKr (linear and conv) and diff / diff_b
    at strength 0.7, against ComfyUI 0.3.64's `load_lora` + `calculate_weight` on the same tensors."""
    from safetensors.torch import load_file

    ref = load_file(DATA / "lora_comfy_patch_refs.safetensors")
    lora = {k[len("lora/"):]: v for k, v in ref.items() if k.startswith("lora/")}
    layers, unknown = group_layers(lora)
    assert not unknown and len(layers) == 7
    worst = 0.0
    for name, parts in layers.items():
        adapters, reason = make_adapters(parts)
        assert reason is None, (name, reason)
        weight = ref[f"weight/{name}"]
        assert adapters["weight"].check(weight.shape) is None
        ours = merged_weight(weight, [WeightPatch(f"{name}.weight", adapters["weight"], 0.7)])
        worst = max(worst, float((ours - ref[f"out/{name}"]).abs().max()))
    bias = merged_weight(torch.zeros(3), [WeightPatch("diff.bias", make_adapters(layers["diff"])[0]["bias"], 0.7)])
    assert torch.equal(bias, ref["out/diff_b"])
    assert worst < 1e-5, worst


def test_group_layers_reads_every_naming():
    t = torch.zeros(1)
    layers, unknown = group_layers({
        "lora_unet_x.lora_up.weight": t, "lora_unet_x.lora_down.weight": t, "lora_unet_x.alpha": t,
        "unet.a.to_q.lora_A.weight": t, "unet.a.to_q.lora_B.weight": t,
        "unet.a.processor.to_k_lora.up.weight": t, "unet.a.processor.to_k_lora.down.weight": t,
        "lycoris_y.hada_w1_a": t, "lycoris_z.lokr_w1": t, "diffusion_model.k.diff_b": t, "junk": t,
    })
    assert set(layers["lora_unet_x"]) == {"up", "down", "alpha"}
    assert set(layers["unet.a.to_q"]) == {"up", "down"}
    assert set(layers["unet.a.processor.to_k"]) == {"up", "down"}
    assert set(layers) >= {"lycoris_y", "lycoris_z", "diffusion_model.k"} and list(unknown) == ["junk"]


# ---------------------------------------------------------------------------
# Key maps on full-size layouts (meta device: no memory).

@functools.lru_cache(maxsize=None)
def _full(family: str):
    config = PRESETS[family]
    with torch.device("meta"):
        unet = UNetModel(config.unet)
        tes = TextEncoderSet([ClipTextEncoder(c) for c in config.text_encoders])
    return config, unet, tes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_trainable_weight_has_a_kohya_and_a_peft_name(family):
    config, unet, tes = _full(family)
    umap = unet_key_map(unet.state_dict(), config.unet)
    by_target: dict[str, set[str]] = {}
    for name, key in umap.items():
        by_target.setdefault(key, set()).add(name)
    layers = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) > 250
    for path in layers:
        names = by_target[path + ".weight"]
        flat = path.replace(".", "_")
        (diffusers, *_) = unet_diffusers_names(path + ".weight", config.unet)
        dpath = diffusers[: -len(".weight")]
        assert {f"lora_unet_{flat}", f"lora_unet_{dpath.replace('.', '_')}", f"unet.{dpath}"} <= names, path
    tmap = text_key_map(tes.state_dict(), [c.name for c in config.text_encoders])
    tnames: dict[str, set[str]] = {}
    for name, key in tmap.items():
        tnames.setdefault(key, set()).add(name)
    linears = [p for p, m in tes.named_modules() if isinstance(m, nn.Linear) and ".layers." in p]
    assert len(linears) == 6 * sum(c.num_layers for c in config.text_encoders)
    for path in linears:
        enc, rest = path.split(".", 2)[1:]
        i = [c.name for c in config.text_encoders].index(enc)
        kohya = f"lora_te{i + 1}_{rest.replace('.', '_')}"
        peft = f"text_encoder{'' if i == 0 else '_2'}.{rest}"
        assert {kohya, peft} <= tnames[path + ".weight"], path


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_names_agree_with_diffusers_converter(family):
    """Our LDM → diffusers naming is what diffusers' own single-file converter produces."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.networks.test_unet import SD15_DIFFUSERS, SDXL_BASE_DIFFUSERS

    config, unet, _ = _full(family)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**{"sd1": SD15_DIFFUSERS, "sdxl": SDXL_BASE_DIFFUSERS}[family])
    keys = list(unet.state_dict())
    tagged = {"model.diffusion_model." + k: torch.full((1,), float(i)) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(tagged, dict(ref.config))
    truth = {keys[int(v.item())]: k for k, v in converted.items()}
    assert len(truth) == len(keys)
    wrong = [k for k in keys if truth[k] not in unet_diffusers_names(k, config.unet)]
    assert not wrong, wrong[:5]


def _comfy_pairs(family: str) -> list[tuple[str, str]]:
    with gzip.open(DATA / f"lora_comfy_keys_{family}.json.gz", "rt") as f:
        return [tuple(p) for p in json.load(f)["pairs"]]


def _ours_from_comfy(key: str) -> str:
    if key.startswith("diffusion_model."):
        return key[len("diffusion_model."):]
    name, rest = key.split(".transformer.", 1)
    return f"encoders.{name}.{rest}"


@pytest.mark.parametrize(("family", "absent"), [("sd1", 13), ("sd2", 12), ("sdxl", 9)])
def test_key_map_matches_comfyui(family, absent):
    """Every name ComfyUI 0.3.64 gives a weight this model has maps to the same weight here.

    `absent`: weights ComfyUI names that this layout does not have (skip convolutions of
    equal-width ResBlocks, a downsampler after the last level, SDXL's label embedding, the
    CLIP-L projection SD1 never uses, ...), counted so a change in either map is noticed."""
    config, unet, tes = _full(family)
    ours = {**unet_key_map(unet.state_dict(), config.unet),
            **text_key_map(tes.state_dict(), [c.name for c in config.text_encoders])}
    have = set(unet.state_dict()) | set(tes.state_dict())
    pairs = _comfy_pairs(family)
    missing_targets = sorted({k for _, k in pairs if _ours_from_comfy(k) not in have})
    shared = [(n, k) for n, k in pairs if _ours_from_comfy(k) in have]
    assert len(missing_targets) == absent, missing_targets
    wrong = [(n, k, ours.get(n)) for n, k in shared if ours.get(n) != _ours_from_comfy(k)]
    assert not wrong, wrong[:5]
    assert len(shared) > 2900


@pytest.mark.parametrize(("family", "style"), [("sdxl", "kohya_ldm"), ("sdxl", "peft"), ("sd2", "kohya")])
def test_full_size_lora_files_match_every_layer(family, style):
    """A LoRA over every Linear/Conv2d of the full-size UNet and text encoders, in each naming, finds
    each layer with a fitting shape (models on the meta device: names and shapes only)."""
    config, unet, tes = _full(family)
    cpu = torch.device("cpu")
    model = DiffusionModel(unet, config, cpu, torch.float32)
    clip = TextEncoder(tes, None, cpu, torch.float32)
    lora = random_lora(config, style=style, rank=1, alpha=1.0, seed=0)
    layers, _ = group_layers(lora)
    res = apply_lora(model, clip, lora, 1.0, 1.0, name=f"{family}_{style}")
    n_unet = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    n_text = sum(isinstance(m, nn.Linear) and ".layers." in p for p, m in tes.named_modules())
    assert not res.report.unmatched and len(layers) == n_unet + n_text
    assert (res.report.unet_layers, res.report.text_layers) == (n_unet, n_text)
    last = config.text_encoders[-1]
    assert f"encoders.{last.name}.text_model.encoder.layers.{last.num_layers - 1}.mlp.fc2.weight" in {
        p.key for p in res.clip.patches}


def test_context_width_names_the_family():
    t = torch.empty
    assert context_width({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": {"down": t(4, 2048)}}) == 2048
    assert context_width({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": {"down": t(4, 768)}}) == 768


# ---------------------------------------------------------------------------
# On a real-layout (shrunk) SD1 checkpoint.

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "checkpoints").mkdir()
    (root / "loras").mkdir()
    ck = load_checkpoint(save_checkpoint(SD1, root / "checkpoints" / "sd1.safetensors", seed=1))
    return root, ck


def _snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each tensor object and a copy of its values."""
    return {k: (v, v.detach().clone()) for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, snap) -> bool:
    now = module.state_dict()
    return now.keys() == snap.keys() and all(
        now[k].data_ptr() == t.data_ptr() and torch.equal(now[k], c) for k, (t, c) in snap.items())


def _hand_merged(model: DiffusionModel, clip: TextEncoder, loras: list[tuple[dict, float, float]]):
    """Copies of the UNet and text encoders with each LoRA's ΔW added by the textbook formula (float64),
    found by name through the LDM/diffusers naming, independently of weight_patch.py."""
    unet, encoders = copy.deepcopy(model.unet), copy.deepcopy(clip.encoders)
    umap = unet_key_map(unet.state_dict(), model.config.unet)
    tmap = text_key_map(encoders.state_dict(), list(encoders.encoders))
    usd, tsd = unet.state_dict(), encoders.state_dict()
    for tensors, s_model, s_clip in loras:
        for key in tensors:
            if not key.endswith((".lora_down.weight", ".lora_A.weight")):
                continue
            layer = key.rsplit(".", 2)[0]
            down = tensors[key].double()
            up = tensors[key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")].double()
            alpha = tensors.get(layer + ".alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            sd, strength = (usd, s_model) if layer in umap else (tsd, s_clip)
            target = (umap if layer in umap else tmap)[layer]
            w = sd[target]
            w.copy_((w.double() + strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)).float())
    return DiffusionModel(unet, model.config, model.device, model.dtype), TextEncoder(encoders, clip.tokenizer,
                                                                                        clip.device, clip.dtype)


def _sample(model, pos, neg):
    return ksample(model, [pos], [neg], torch.zeros(1, 4, 8, 8), seed=7, steps=2, cfg=4.0)


def test_patch_and_unpatch_leave_base_weights_bit_identical(models):
    _, ck = models
    unet_snap, text_snap = _snapshot(ck.model.unet), _snapshot(ck.text_encoder.encoders)
    lora = random_lora(SD1, style="kohya", rank=4, alpha=2.0, seed=1, scale=0.02)
    res = apply_lora(ck.model, ck.text_encoder, lora, 0.8, 0.6)
    assert res.model is not ck.model and res.model.unet is ck.model.unet and not ck.model.patches
    assert len(res.model.patches) == res.report.unet_layers > 200 and res.report.text_layers == 72
    cond = res.clip.encode("a red cube")
    assert not torch.equal(cond.context, ck.text_encoder.encode("a red cube").context)
    d = res.model.denoiser()
    x, sigma = torch.randn(1, 4, 8, 8, generator=_gen(0)), torch.tensor([3.0])
    assert not torch.equal(d(x, sigma, cond.context), ck.model.denoiser()(x, sigma, cond.context))
    with res.model.weights_applied() as unet:
        key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        assert not torch.equal(unet.state_dict()[key], unet_snap[key][1])
    assert _unchanged(ck.model.unet, unet_snap) and _unchanged(ck.text_encoder.encoders, text_snap)


def test_node_lora_equals_weights_merged_by_hand_and_stacks(models):
    """Two LoRAs (kohya with α and LoCon convs, PEFT without α) chained through the core LoraLoader
    nodes: the sampled latent and the text conditioning equal those of hand-merged weight copies."""
    from ldm_nodes.context import NodeContext
    from ldm_nodes.registry import headless_registry

    root, ck = models
    first = random_lora(SD1, style="kohya", rank=4, alpha=2.0, seed=2, scale=0.02)
    second = random_lora(SD1, style="peft", rank=2, seed=3, scale=0.02, convs=False)
    save_lora(first, root / "loras" / "first.safetensors")
    save_lora(second, root / "loras" / "second.pt")  # weights-only pickle path
    ctx = NodeContext({"loras": [root / "loras"]})
    reg = headless_registry()
    assert ctx.list_models("loras") == ["first.safetensors", "second.pt"]
    assert tuple(i.name for i in reg["LoraLoader"].inputs) == (
        "model", "clip", "lora_name", "strength_model", "strength_clip")
    model, clip = reg["LoraLoader"].run(ctx, model=ck.model, clip=ck.text_encoder, lora_name="first.safetensors",
                                        strength_model=0.9, strength_clip=0.5)
    model, clip = reg["LoraLoader"].run(ctx, model=model, clip=clip, lora_name="second.pt",
                                        strength_model=-0.6, strength_clip=1.2)
    (only,) = reg["LoraLoaderModelOnly"].run(ctx, model=ck.model, lora_name="first.safetensors", strength_model=0.9)
    firsts = [p.key for p in model.patches if p.source == "first.safetensors"]
    assert [p.key for p in only.patches] == firsts and len(model.patches) > len(firsts) > 200
    ref_model, ref_clip = _hand_merged(ck.model, ck.text_encoder, [(first, 0.9, 0.5), (second, -0.6, 1.2)])

    pos, ref_pos = clip.encode("a red cube"), ref_clip.encode("a red cube")
    assert (pos.context - ref_pos.context).abs().max() < 1e-5  # measured 1.4e-6 (values up to 2.8)
    neg = ck.text_encoder.encode("")
    out, ref = _sample(model, pos, neg), _sample(ref_model, pos, neg)
    base = _sample(ck.model, pos, neg)
    assert (out - base).abs().max() > 1e-2  # the LoRA does change the result ...
    # ... exactly as merging does: measured 8.3e-4 on latents up to 350 (2.4e-6 relative: float32 rounding
    # of W + ΔW, float64 by hand here, carried through two steps of a random UNet)
    assert (out - ref).abs().max() < 3e-5 * float(ref.abs().max())


def test_unmatched_keys_are_reported_and_logged(models, caplog):
    _, ck = models
    lora = random_lora(SD1, style="kohya_ldm", rank=2, alpha=1.0, seed=4, scale=0.01, text=False)
    lora["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    lora["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    dora = "lora_unet_input_blocks_1_1_proj_in"
    lora[dora + ".dora_scale"] = torch.ones(SD1.unet.model_channels, 1)
    lora["something_else"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING, logger="ldm_core.lora"):
        res = apply_lora(ck.model, ck.text_encoder, lora, 1.0, 1.0, name="mixed.safetensors")
    unmatched = res.report.unmatched
    assert "lora_unet_no_such_layer[down]" in unmatched and "something_else" in unmatched
    assert "DoRA" in unmatched[f"{dora}[dora_scale]"]
    assert "mixed.safetensors" in caplog.text and "NOT applied" in caplog.text and "no_such_layer" in caplog.text
    assert res.clip is ck.text_encoder  # nothing for the text encoder in this file


def test_loader_nodes_show_what_was_not_applied(models):
    """The node returns ComfyUI's {"ui": {"text": [...]}, "result": ...} when part of a file was not applied."""
    from ldm_nodes.comfy_adapter import node_mappings
    from ldm_nodes.context import NodeContext
    from ldm_nodes.registry import headless_registry, pack_specs

    root, ck = models
    lora = random_lora(SD1, style="kohya", rank=2, alpha=1.0, seed=8, scale=0.01, attention_only=True, text=False)
    lora["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    save_lora(lora, root / "loras" / "partial.safetensors")
    spec = headless_registry()["LoraLoader"]
    ctx = NodeContext({"loras": [root / "loras"]})
    out = spec.run(ctx, model=ck.model, clip=ck.text_encoder, lora_name="partial.safetensors",
                   strength_model=1.0, strength_clip=1.0)
    assert "lora_unet_not_a_layer[down]" in out["ui"]["text"][0] and out["result"][0].patches
    assert spec.run(ctx, model=ck.model, clip=ck.text_encoder, lora_name="missing.safetensors",
                    strength_model=0.0, strength_clip=0.0) == (ck.model, ck.text_encoder)  # ComfyUI: no file read
    classes, _ = node_mappings(pack_specs(), context_factory=lambda: ctx)
    types = classes["LDMLoraLoader"].INPUT_TYPES()["required"]
    assert list(types) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert "partial.safetensors" in types["lora_name"][0] and types["strength_model"][1]["min"] == -100.0
    assert classes["LDMLoraLoaderModelOnly"].RETURN_TYPES == ("LDM_MODEL",)


def test_lora_of_another_family_is_a_clear_error(models):
    _, ck = models
    xl = random_lora(shrink(PRESETS["sdxl"]), style="kohya_ldm", rank=2, alpha=1.0, seed=5, attention_only=True)
    with pytest.raises(LoraMismatchError, match="other shapes.*context width 128; this model's is 48"):
        apply_lora(ck.model, ck.text_encoder, xl, 1.0, 1.0, name="xl.safetensors")
    with pytest.raises(LoraMismatchError, match="no LoRA"):
        apply_lora(ck.model, None, {"model.diffusion_model.out.2.weight": torch.zeros(1)}, 1.0, 0.0)


def test_text_only_lora_on_model_only_loader_is_skipped_not_an_error(models):
    _, ck = models
    lora = random_lora(SD1, style="peft", rank=2, seed=6, unet=False)
    res = apply_lora(ck.model, None, lora, 1.0, 0.0)
    assert res.model is ck.model and res.report.skipped and not res.report.unmatched


def test_patched_swap_restores_on_error_and_refuses_nesting():
    layer = nn.Linear(3, 2)
    original = layer.weight
    p = [WeightPatch("weight", Full(torch.ones(2, 3)), 1.0)]
    with pytest.raises(ZeroDivisionError):
        with patched(layer, p):
            assert torch.equal(layer.weight, original + 1)
            1 / 0
    assert layer.weight is original
    with patched(layer, p), pytest.raises(RuntimeError, match="already patched"):
        with patched(layer, p):
            pass
    assert layer.weight is original


def _core_graph(strength: float) -> dict:
    """ComfyUI core nodes: checkpoint → LoraLoader → prompts → KSampler → decode → save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "graph.safetensors",
                                                     "strength_model": strength, "strength_clip": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "lora"}},
    }


def test_core_lora_loader_runs_headless_in_a_saved_graph(models, tmp_path):
    """`ldm-run` on a saved graph of ComfyUI core nodes with a LoraLoader: it runs, and strength 1
    changes the image strength 0 (inputs passed through unchanged) gives."""
    from ldm_nodes.cli import main as ldm_run

    root, _ = models
    lora = random_lora(SD1, style="kohya_ldm", rank=4, alpha=4.0, seed=9, scale=0.05, attention_only=True)
    save_lora(lora, root / "loras" / "graph.safetensors")
    pixels = {}
    for strength in (0.0, 1.0):
        graph = tmp_path / f"graph_{strength}.json"
        graph.write_text(json.dumps(_core_graph(strength)))
        out = tmp_path / f"out_{strength}"
        assert ldm_run([str(graph), "--models-dir", str(root), "--output-dir", str(out), "--quiet"]) == 0
        (png,) = out.glob("*.png")
        pixels[strength] = torch.frombuffer(bytearray(Image.open(png).tobytes()), dtype=torch.uint8)
    plain = pixels[0.0]
    assert (pixels[1.0].int() - plain.int()).abs().max() > 0


def test_strength_zero_is_bit_identical_to_no_lora(models):
    """Strength 0 changes nothing: `apply_lora` and the loader node hand back the inputs themselves,
    so sampling and text encoding are bit-identical to no LoRA. Patches forced through the merge
    at strength 0 give weights bit-identical to the base (W + 0·ΔW = W)."""
    import dataclasses

    from ldm_nodes.context import NodeContext
    from ldm_nodes.registry import headless_registry

    root, ck = models
    lora = random_lora(SD1, style="kohya", rank=4, alpha=2.0, seed=10, scale=0.05)
    save_lora(lora, root / "loras" / "zero.safetensors")
    res = apply_lora(ck.model, ck.text_encoder, lora, 0.0, 0.0)
    assert res.model is ck.model and res.clip is ck.text_encoder
    node = headless_registry()["LDMLoraLoader"]
    model, clip = node.run(NodeContext({"loras": [root / "loras"]}), model=ck.model, clip=ck.text_encoder,
                           lora_name="zero.safetensors", strength_model=0.0, strength_clip=0.0)
    half = apply_lora(ck.model, ck.text_encoder, lora, 0.0, 1.0)  # one part at 0, the other patched
    assert half.model is ck.model and half.clip.patches
    pos, neg = ck.text_encoder.encode("a red cube"), ck.text_encoder.encode("")
    base = _sample(ck.model, pos, neg)
    npos = clip.encode("a red cube")
    assert torch.equal(npos.context, pos.context) and torch.equal(npos.pooled, pos.pooled)
    assert torch.equal(_sample(model, npos, clip.encode("")), base)

    full = apply_lora(ck.model, ck.text_encoder, lora, 1.0, 1.0)
    zero_model = ck.model.with_patches([dataclasses.replace(p, strength=0.0) for p in full.model.patches])
    assert len(zero_model.patches) > 200
    sd = ck.model.unet.state_dict()
    merged = merged_weights(ck.model.unet, zero_model.patches)
    assert all(torch.equal(w, sd[k]) for k, w in merged.items())  # every merged weight bit-identical
    # The sampled latent agrees to float32 rounding only: the merged copies are fresh 64-byte-aligned
    # tensors, the loaded weights are not, and the CPU matmul/conv kernels round differently by alignment
    # (cloning the base weights without any LoRA moves the result as much). Measured 6.9e-4 on values up to
    # 350 (2e-6 relative).
    zero = _sample(zero_model, pos, neg)
    assert (zero - base).abs().max() < 1e-5 * float(base.abs().max())
    assert (_sample(full.model, pos, neg) - base).abs().max() > 1e-2  # the same patches at strength 1 do change it


def test_kohya_file_changes_exactly_the_layers_it_names(models):
    """A kohya file naming a subset of the UNet's and the text encoder's layers (linears and LoCon
    convs): with it merged, every weight of the model is compared with the base; the changed set is
    exactly the set the file names, and every other tensor is bit-identical."""
    _, ck = models
    full = random_lora(SD1, style="kohya", rank=2, alpha=1.0, seed=11, scale=0.05)
    layers = sorted({k.split(".", 1)[0] for k in full})
    unet_names = [n for n in layers if n.startswith("lora_unet_")][::5]
    text_names = [n for n in layers if n.startswith("lora_te")][::7]
    chosen = set(unet_names) | set(text_names)
    subset = {k: v for k, v in full.items() if k.split(".", 1)[0] in chosen}
    umap = unet_key_map(ck.model.unet.state_dict(), SD1.unet)
    tmap = text_key_map(ck.text_encoder.encoders.state_dict(), list(ck.text_encoder.encoders.encoders))
    named_unet, named_text = {umap[n] for n in unet_names}, {tmap[n] for n in text_names}
    assert any(ck.model.unet.state_dict()[k].ndim == 4 for k in named_unet)  # some 3×3 / 1×1 convs among them
    assert len(named_unet) == len(unet_names) > 40 and len(named_text) == len(text_names) > 5

    res = apply_lora(ck.model, ck.text_encoder, subset, 0.7, 1.3, name="subset.safetensors")
    assert not res.report.unmatched
    assert (res.report.unet_layers, res.report.text_layers) == (len(unet_names), len(text_names))
    for base_module, view_patches, named in ((ck.model.unet, res.model.patches, named_unet),
                                             (ck.text_encoder.encoders, res.clip.patches, named_text)):
        before = {k: v.detach().clone() for k, v in base_module.state_dict().items()}
        with patched(base_module, view_patches) as merged:
            after = merged.state_dict()
            changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
        assert changed == named, (sorted(changed - named)[:5], sorted(named - changed)[:5])
        assert all(torch.equal(base_module.state_dict()[k], v) for k, v in before.items())  # restored after


def test_embedded_models_context_map_has_lora_names():
    """The embedded model's context map (no diffusers counterpart) is reachable by LoRA files under
    its own path in every naming: kohya `lora_unet_context_map_mlp_0`, peft `unet.context_map.mlp.0`."""
    from ldm_core.checkpoints.embedded import EMBEDDED_PATH
    from ldm_core.lab.train.diffusion_stage import read_checkpoint

    config = read_checkpoint(EMBEDDED_PATH)[0]
    assert config.unet.context_map_grid > 0
    with torch.device("meta"):
        unet = UNetModel(config.unet)
    umap = unet_key_map(unet.state_dict(), config.unet)
    for path in ("context_map.mlp.0", "context_map.mlp.2", "context_map.proj"):
        names = {n for n, k in umap.items() if k == path + ".weight"}
        assert {f"lora_unet_{path.replace('.', '_')}", f"unet.{path}"} <= names, (path, names)
