"""Layouts: the text format, regional prompts from boxes, box-layout tokens (known answers),
the layout encoder (parity with the original LDM transformer, recorded by
tests/tools/record_cond_refs.py; strict state-dict round trip; padding and batch
invariance), and a generated encoder driving a tiny UNet through the sampler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm_core.conditioning.cond import Area, Cond
from ldm_core.conditioning.layout import (
    Box,
    LayoutEncoderConfig,
    LayoutError,
    corner_token,
    layout_state_dict,
    load_layout_encoder,
    parse_layout,
    random_layout_encoder,
    regional_conditioning,
    resolve_classes,
    tokenize_layout,
)
from ldm_core.errors import ConfigError
from ldm_core.networks.config import ScheduleConfig
from ldm_core.networks.presets import PRESETS, shrink
from ldm_core.networks.unet import UNetModel
from ldm_core.sampling.denoiser import Denoiser
from ldm_core.sampling.guidance import CFGGuider
from ldm_core.sampling.schedule import DiscreteSchedule, get_sigmas
from ldm_core.sampling.solvers import sample_euler

DATA = Path(__file__).parents[1] / "data"
SMALL = LayoutEncoderConfig(vocab_size=101, num_classes=20, max_objects=4, max_seq_len=14, dim=48, depth=1,
                            heads=2, dim_head=8)


# ---- the layout text ----

def test_parse_layout_units_comments_and_strength():
    objs = parse_layout("""
        a red circle | 0.1 0.1 0.4 0.4   # fractions
        # a comment line
        a blue square | 256, 64, 448, 320
        a tree | 10% 50% 40% 100% | 1.5
        a cat | 8px 8px 64px 64px
    """)
    assert [o.label for o in objs] == ["a red circle", "a blue square", "a tree", "a cat"]
    assert objs[0].box == Box(0.1, 0.1, 0.4, 0.4) and objs[0].strength is None
    assert objs[1].box == Box(256, 64, 448, 320, pixels=True)
    assert objs[2].box == Box(0.1, 0.5, 0.4, 1.0) and objs[2].strength == 1.5
    assert objs[3].box.pixels and objs[3].box.x1 == 64


@pytest.mark.parametrize("text, match", [
    ("a cat 0.1 0.1 0.4 0.4", "line 1: write `prompt"),
    (" | 0.1 0.1 0.4 0.4", "prompt .* is empty"),
    ("a cat | 0.1 0.1 0.4", "four numbers"),
    ("a cat | 0.4 0.1 0.1 0.4", "x1 > x0"),
    ("\na cat | 0.1 0.1 0.4 abc", "line 2: 'abc' is not a number"),
    ("a cat | 10% 10% 0.5 0.5", "mix of units"),
    ("a cat | 10% 10% 150% 50%", "within the image"),
    ("a cat | 0.1 0.1 0.4 0.4 | strong", "strength 'strong'"),
])
def test_parse_layout_errors_name_the_line(text, match):
    with pytest.raises(LayoutError, match=match):
        parse_layout(text)


def test_box_areas_fractions_and_pixels_snapped_outward():
    assert Box(0.1, 0.2, 0.4, 0.6).area() == Area(0.6 - 0.2, 0.4 - 0.1, 0.2, 0.1, fraction=True)
    assert Box(12, 20, 100, 70, pixels=True).area() == Area(9 - 2, 13 - 1, 2, 1)  # cells 2..8 × 1..12
    assert Box(64, 32, 128, 96, pixels=True).fractions(256, 128) == (0.25, 0.25, 0.5, 0.75)
    with pytest.raises(LayoutError, match="width and height"):
        Box(1, 1, 2, 2, pixels=True).fractions()


def test_regional_conditioning_one_area_entry_per_box_plus_global():
    def encode(text: str) -> Cond:
        return Cond(torch.full((1, 77, 8), float(len(text))))

    objs = parse_layout("sun | 0.5 0 1 0.5 | 2\ngrass | 0 384 512 512")
    conds = regional_conditioning(encode, objs, "a meadow", strength=0.8)
    assert len(conds) == 3 and conds[0].area is None and float(conds[0].context[0, 0, 0]) == len("a meadow")
    assert conds[1].area == Area(0.5, 0.5, 0.0, 0.5, fraction=True) and conds[1].strength == 2.0
    assert conds[2].area == Area(16, 64, 48, 0) and conds[2].strength == 0.8
    assert float(conds[2].context[0, 0, 0]) == len("grass")
    assert len(regional_conditioning(encode, objs)) == 2
    with pytest.raises(LayoutError, match="no objects"):
        regional_conditioning(encode, [], "  ")


# ---- tokens ----

def test_corner_tokens_known_answers():
    big = LayoutEncoderConfig()  # 8192 tokens: a 90 × 90 grid
    assert big.grid == 90 and big.pad_token == 8191 and big.seq_len == 90
    assert corner_token(big, 0.0, 0.0) == 0
    assert corner_token(big, 1.0, 1.0) == 89 * 90 + 89 == 8099
    assert corner_token(big, 0.5, 0.5) == 44 * 90 + 44  # 44.5 rounds half to even
    assert corner_token(big, 0.25, 0.75) == 67 * 90 + 22  # y 66.75 → 67, x 22.25 → 22
    assert corner_token(SMALL, 0.1, 0.2) == 2 * 10 + 1  # 10 × 10 grid: x 0.9 → 1, y 1.8 → 2
    with pytest.raises(LayoutError, match="outside"):
        corner_token(SMALL, 1.2, 0.0)


def test_tokenize_layout_triples_and_padding():
    tokens = tokenize_layout(SMALL, [(3, (0.1, 0.2, 0.5, 0.6)), (17, (0.0, 0.0, 1.0, 1.0))])
    assert tokens.tolist() == [3, 21, 54, 17, 0, 99, 100, 100, 100, 100, 100, 100]  # x 4.5 → 4 (half to even)
    # the objects' tokens do not depend on how far the sequence is padded
    longer = LayoutEncoderConfig(**{**SMALL.to_dict(), "max_objects": 30, "max_seq_len": 92})
    assert tokenize_layout(longer, [(3, (0.1, 0.2, 0.5, 0.6))])[:3].tolist() == [3, 21, 54]
    assert (tokenize_layout(longer, []) == 100).all()
    with pytest.raises(LayoutError, match="at most 4"):
        tokenize_layout(SMALL, [(0, (0, 0, 1, 1))] * 5)
    with pytest.raises(LayoutError, match="class id 20"):
        tokenize_layout(SMALL, [(20, (0, 0, 1, 1))])


def test_resolve_classes_through_a_vocabulary():
    objs = parse_layout("Cat | 0 0 0.5 0.5\ndog | 0 0 256 256")
    assert resolve_classes(objs, ["dog", "cat"], 512, 512) == [(1, (0, 0, 0.5, 0.5)), (0, (0, 0, 0.5, 0.5))]
    with pytest.raises(LayoutError, match="close: cat"):
        resolve_classes(parse_layout("cats | 0 0 1 1"), ["dog", "cat"])


# ---- the encoder ----

def test_encoder_matches_the_original_ldm_transformer():
    with safe_open(DATA / "cond_layout_ref.safetensors", "pt") as f:
        meta = f.metadata()
        tokens, want = f.get_tensor("tokens"), f.get_tensor("context")
    config = LayoutEncoderConfig(**json.loads(meta["config"]))
    encoder = random_layout_encoder(config, seed=int(meta["seed"]))
    objs = json.loads(meta["objects"])
    assert torch.equal(torch.stack([tokenize_layout(config, [(k, tuple(b)) for k, b in o]) for o in objs]), tokens)
    with torch.no_grad():
        got = encoder(tokens)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_state_dict_round_trip_and_strict_keys():
    encoder = random_layout_encoder(SMALL, seed=1)
    sd = layout_state_dict(encoder)
    assert all(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert "cond_stage_model.transformer.attn_layers.layers.1.1.net.0.0.weight" in sd  # the LDM key layout
    checkpoint = {**sd, "model.diffusion_model.out.0.weight": torch.zeros(1)}  # other parts are ignored
    loaded = load_layout_encoder(checkpoint, SMALL)
    tokens = tokenize_layout(SMALL, [(5, (0.2, 0.2, 0.8, 0.9))])[None]
    with torch.no_grad():
        assert torch.equal(loaded(tokens), encoder(tokens))
    missing = {k: v for k, v in sd.items() if not k.endswith("norm.bias")}
    with pytest.raises(LayoutError, match="missing .*norm.bias"):
        load_layout_encoder(missing, SMALL)
    with pytest.raises(LayoutError, match="unexpected .*extra"):
        load_layout_encoder({**sd, "cond_stage_model.transformer.extra": torch.zeros(1)}, SMALL)
    bad = dict(sd)
    bad["cond_stage_model.transformer.token_emb.weight"] = torch.zeros(100, 48)
    with pytest.raises(LayoutError, match="token_emb.weight: shape"):
        load_layout_encoder(bad, SMALL)
    assert LayoutEncoderConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match="unknown keys"):
        LayoutEncoderConfig.from_dict({**SMALL.to_dict(), "width": 3})


def test_random_encoder_is_deterministic_and_batching_changes_nothing():
    a, b = random_layout_encoder(SMALL, seed=3), random_layout_encoder(SMALL, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    one = tokenize_layout(SMALL, [(1, (0.0, 0.0, 0.5, 0.5))])
    three = tokenize_layout(SMALL, [(1, (0.0, 0.0, 0.5, 0.5)), (2, (0.5, 0.5, 1, 1)), (7, (0.1, 0.6, 0.3, 0.9))])
    with torch.no_grad():
        batched = a(torch.stack([one, three]))
        torch.testing.assert_close(batched[0], a(one[None])[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched[1], a(three[None])[0], atol=1e-6, rtol=1e-6)
    cond = a.encode([(1, (0.0, 0.0, 0.5, 0.5))])
    assert cond.context.shape == (1, 12, 48) and torch.allclose(cond.context, batched[:1], atol=1e-6)


def test_layout_encoder_drives_a_tiny_unet_through_the_sampler():
    cfg = shrink(PRESETS["sd1"])
    cfg = cfg.replace(unet=cfg.unet.replace(channel_mult=(1, 2), transformer_depth=(1, 1), num_res_blocks=1))
    assert cfg.unet.context_dim == SMALL.dim
    torch.manual_seed(0)
    unet = UNetModel(cfg.unet).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    schedule = DiscreteSchedule(ScheduleConfig())
    denoiser = Denoiser(unet, schedule, "eps", torch.float32)
    encoder = random_layout_encoder(SMALL, seed=2)
    layout_a = encoder.encode(resolve_classes(parse_layout("cat | 0 0 0.5 0.5\ndog | 0.5 0.5 1 1"),
                                              [f"c{i}" for i in range(18)] + ["cat", "dog"]))
    layout_b = encoder.encode([(4, (0.2, 0.1, 0.9, 0.4))])
    empty = encoder.encode([])
    sigmas = get_sigmas(schedule, "normal", 2)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])

    def run(layout):
        guider = CFGGuider(denoiser, cfg, [layout], [empty], 3.0, (64, 64))
        with torch.inference_mode():
            return sample_euler(guider, noise.clone(), sigmas)

    a, b = run(layout_a), run(layout_b)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert float((a - b).abs().max()) > 1e-4  # the layout reaches the image


def test_layout_encode_node_resolves_names_and_ids():
    from ldm_nodes.registry import pack_specs

    spec = pack_specs()["LDMLayoutEncode"]
    encoder = random_layout_encoder(SMALL, seed=0)
    (conds,) = spec.run(None, layout_encoder=encoder, layout_text="dog | 0 0 128 128\n7 | 0.5 0.5 1 1",
                        classes="cat, dog", width=256, height=256)
    want = encoder.encode([(1, (0.0, 0.0, 0.5, 0.5)), (7, (0.5, 0.5, 1.0, 1.0))])
    assert len(conds) == 1 and torch.equal(conds[0].context, want.context)
    with pytest.raises(LayoutError, match="no per-object strength"):
        spec.run(None, layout_encoder=encoder, layout_text="dog | 0 0 1 1 | 2", classes="dog", width=64, height=64)


def test_box_fourier_known_answer():
    """Each object's box (decoded from its corner tokens, fractions of the 10-cell grid) → for v in
    x0, y0, x1, y1: sin(2^k·π·v), then cos(2^k·π·v), k = 0, 1."""
    import math

    from ldm_core.conditioning.layout import box_fourier

    config = SMALL.replace(box_features=2)
    tokens = tokenize_layout(config, [(3, (0.0, 1.0, 1.0, 1.0)), (4, (1 / 3, 2 / 9, 5 / 9, 7 / 9))])[None]
    f = box_fourier(config, tokens)
    assert f.shape == (1, 4, 16)
    for obj, coords in enumerate([(0.0, 1.0, 1.0, 1.0), (3 / 9, 2 / 9, 5 / 9, 7 / 9)]):
        want = torch.tensor([f(v * math.pi * m) for v in coords for f in (math.sin, math.cos) for m in (1, 2)])
        torch.testing.assert_close(f[0, obj], want, atol=1e-6, rtol=0)


def test_box_features_start_at_zero_effect_and_skip_padding():
    """The box embedding starts at zero (the paper's encoder exactly); it feeds each object's class
    token and never a pad triple: with only its bias set, an all-pad layout is unchanged."""
    config = SMALL.replace(box_features=3)
    plain = random_layout_encoder(SMALL, seed=2)
    boxed = random_layout_encoder(config, seed=2)
    with torch.no_grad():
        boxed.transformer.box_emb.weight.zero_()
        boxed.transformer.box_emb.bias.zero_()
    missing, unexpected = plain.load_state_dict(boxed.state_dict(), strict=False)
    assert not missing and unexpected == ["transformer.box_emb.weight", "transformer.box_emb.bias"]
    tokens = torch.stack([tokenize_layout(SMALL, [(1, (0.1, 0.2, 0.5, 0.6))]), tokenize_layout(SMALL, [])])
    with torch.no_grad():
        assert torch.equal(boxed(tokens), plain(tokens))
        torch.nn.init.normal_(boxed.transformer.box_emb.bias)
        out = boxed(tokens)
        assert torch.equal(out[1], plain(tokens)[1]) and (out[0] - plain(tokens)[0]).abs().max() > 1e-3
        torch.nn.init.normal_(boxed.transformer.box_emb.weight)
        moved = boxed(tokenize_layout(SMALL, [(1, (0.4, 0.2, 0.9, 0.6))])[None])
        assert (moved[0] - boxed(tokens[:1])[0]).abs().max() > 1e-3  # the box now moves the class token too
    with pytest.raises(LayoutError, match="triples"):
        boxed(tokens[:, :7])
    with pytest.raises(ConfigError, match="box_features"):
        SMALL.replace(box_features=-1)
