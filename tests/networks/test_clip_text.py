"""CLIP text encoders: key parity with diffusers' converters, output parity with transformers,
ComfyUI `encode_token_weights` known answers, strict-loading errors.

Narrow same-layout configs (`shrink`) with random weights on CPU fp32; the full-size key
sets are checked on the meta device only. File layouts are spelled out here by hand
(independently of `clip_keys`), so a wrong table fails the tests.
"""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_core.errors import ConfigError, PromptError, StateDictMismatchError
from ldm_core.networks import clip_keys
from ldm_core.networks.clip_text import END_TOKEN, START_TOKEN, ClipTextEncoder, TextEncoderSet
from ldm_core.networks.config import TextEncoderConfig
from ldm_core.networks.presets import CLIP_G, CLIP_H, CLIP_L, PRESETS, shrink

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
)

TOL = 1e-4  # max |ours - ref| / max |ref|
SMALL_L = shrink(PRESETS["sd1"]).text_encoders[0]
SMALL_H = shrink(PRESETS["sd2"]).text_encoders[0]
SMALL_L_XL, SMALL_G = shrink(PRESETS["sdxl"]).text_encoders
SD2_PREFIX = "cond_stage_model.model."
SDXL_G_PREFIX = "conditioner.embedders.1.model."


# ---------------------------------------------------------------- file layouts, by hand

def hf_file_shapes(c: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """transformers CLIPTextModel(WithProjection) keys as SD1 / SDXL CLIP-L files hold them."""
    d, i = c.hidden_size, c.intermediate_size
    shapes = {
        "text_model.embeddings.token_embedding.weight": (c.vocab_size, d),
        "text_model.embeddings.position_embedding.weight": (c.max_positions, d),
        "text_model.final_layer_norm.weight": (d,),
        "text_model.final_layer_norm.bias": (d,),
    }
    for n in range(c.num_layers):
        p = f"text_model.encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (d, d)
            shapes[p + f"self_attn.{proj}.bias"] = (d,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{ln}.weight"] = (d,)
            shapes[p + f"{ln}.bias"] = (d,)
        shapes.update({p + "mlp.fc1.weight": (i, d), p + "mlp.fc1.bias": (i,),
                       p + "mlp.fc2.weight": (d, i), p + "mlp.fc2.bias": (d,)})
    if c.projection_dim is not None:
        shapes["text_projection.weight"] = (c.projection_dim, d)
    return shapes


def openclip_file_shapes(c: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """OpenCLIP text-tower keys as SD2 / SDXL bigG files hold them (after the prefix)."""
    d, i = c.hidden_size, c.intermediate_size
    shapes = {
        "token_embedding.weight": (c.vocab_size, d),
        "positional_embedding": (c.max_positions, d),
        "ln_final.weight": (d,),
        "ln_final.bias": (d,),
        "text_projection": (d, c.projection_dim),
        "logit_scale": (),
    }
    for n in range(c.num_layers):
        p = f"transformer.resblocks.{n}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
            p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (i, d), p + "mlp.c_fc.bias": (i,),
            p + "mlp.c_proj.weight": (d, i), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Non-trivial values with O(1) activations: matrices variance-preserving, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "embedding" in name:
            out[name] = 0.5 * noise
        elif name == "text_projection":  # [D, P], used as x @ P
            out[name] = noise / shape[0] ** 0.5
        elif len(shape) == 2:
            out[name] = noise / shape[1] ** 0.5
        elif ("ln" in name or "norm" in name) and name.endswith("weight"):
            out[name] = 1.0 + 0.2 * noise
        else:
            out[name] = 0.1 * noise
    return out


def reference_model(c: TextEncoderConfig, num_layers: int | None = None, projection: bool = True) -> torch.nn.Module:
    """The transformers model diffusers would build for this tower (eager attention: another code path)."""
    hf = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=num_layers or c.num_layers, num_attention_heads=c.num_heads,
        max_position_embeddings=c.max_positions, hidden_act=c.hidden_act,
        projection_dim=c.projection_dim or c.hidden_size, bos_token_id=START_TOKEN, eos_token_id=END_TOKEN,
        attn_implementation="eager",
    )
    cls = CLIPTextModelWithProjection if projection and c.projection_dim else CLIPTextModel
    return cls(hf).eval()


def load_reference(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> dict[str, str]:
    """Load diffusers' converted dict as diffusers does; returns {reference name: our name}."""
    flat = not hasattr(model, "text_model")  # transformers >= 5.6 flattened CLIPTextModel
    sd = {(k.removeprefix("text_model.") if flat else k): v for k, v in converted.items()}
    sd.pop("embeddings.position_ids", None)
    sd.pop("text_model.embeddings.position_ids", None)
    model.load_state_dict(sd, strict=True)
    return {k: ("text_model." + k if flat else k) for k in model.state_dict()}


def tokens_batch(c: TextEncoderConfig, seed: int = 0) -> torch.Tensor:
    """Start token, random words, the end token at 3 different places, the config's padding."""
    g = torch.Generator().manual_seed(seed)
    ends = [4, 33, c.max_positions - 1]
    tokens = torch.randint(0, START_TOKEN, (len(ends), c.max_positions), generator=g)
    tokens[:, 0] = START_TOKEN
    for row, end in enumerate(ends):
        tokens[row, end] = END_TOKEN
        tokens[row, end + 1:] = c.pad_token
    return tokens


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def clip_l() -> tuple[dict, ClipTextEncoder]:
    sd = random_weights(hf_file_shapes(SMALL_L), seed=1)
    return sd, ClipTextEncoder.from_state_dict(SMALL_L, sd)


@pytest.fixture(scope="module")
def clip_h() -> tuple[dict, ClipTextEncoder]:
    sd = random_weights(openclip_file_shapes(SMALL_H), seed=2)
    return sd, ClipTextEncoder.from_state_dict(SMALL_H, sd)


@pytest.fixture(scope="module")
def clip_g() -> tuple[dict, ClipTextEncoder]:
    sd = random_weights(openclip_file_shapes(SMALL_G), seed=3)
    return sd, ClipTextEncoder.from_state_dict(SMALL_G, sd)


# ---------------------------------------------------------------- 1. key parity with diffusers

def assert_same_tensors(ours: ClipTextEncoder, ref: torch.nn.Module, names: dict[str, str]) -> None:
    own = ours.state_dict()
    for ref_name, tensor in ref.state_dict().items():
        assert ref_name in names, ref_name
        assert torch.equal(own[names[ref_name]], tensor), ref_name


def test_sd1_keys_match_diffusers(clip_l):
    sd, ours = clip_l
    file = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
    file["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ref = reference_model(SMALL_L)
    names = load_reference(ref, convert_ldm_clip_checkpoint(file))
    assert set(names.values()) == set(ours.state_dict())
    assert_same_tensors(ours, ref, names)


@pytest.mark.parametrize("prefix", [SDXL_G_PREFIX, "conditioner.embedders.0.model."])
def test_bigg_keys_match_diffusers(clip_g, prefix):
    sd, ours = clip_g
    ref = reference_model(SMALL_G)
    converted = convert_open_clip_checkpoint(ref, {prefix + k: v for k, v in sd.items()}, prefix=prefix)
    names = load_reference(ref, converted)
    assert set(names.values()) == set(ours.state_dict())
    assert_same_tensors(ours, ref, names)


def test_sd2_keys_match_diffusers(clip_h):
    """diffusers' SD2 text encoder drops the last block and the projection (it only needs the
    penultimate layer); every tensor it keeps is ours, bit for bit."""
    sd, ours = clip_h
    ref = reference_model(SMALL_H, num_layers=SMALL_H.num_layers - 1, projection=False)
    converted = convert_open_clip_checkpoint(ref, {SD2_PREFIX + k: v for k, v in sd.items()}, prefix=SD2_PREFIX)
    names = load_reference(ref, converted)
    assert_same_tensors(ours, ref, names)
    last = f"text_model.encoder.layers.{SMALL_H.num_layers - 1}."
    assert set(ours.state_dict()) - set(names.values()) == {
        k for k in ours.state_dict() if k.startswith(last)
    } | {"text_projection.weight"}


# ---------------------------------------------------------------- 2. output parity with transformers

def parity(ours: ClipTextEncoder, ref: torch.nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    out = ref(input_ids=tokens, output_hidden_states=True)
    text = getattr(ref, "text_model", ref)
    ref_pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    pen = out.hidden_states[-2]
    cases = {
        "last+norm": (ours(tokens, layer_idx=None)[0], out.last_hidden_state),
        "last, no norm": (ours(tokens, layer_idx=-1, layer_norm_hidden_state=False)[0], out.hidden_states[-1]),
        "penultimate, no norm": (ours(tokens, layer_idx=-2, layer_norm_hidden_state=False)[0], pen),
        "penultimate+norm": (ours(tokens, layer_idx=-2, layer_norm_hidden_state=True)[0], text.final_layer_norm(pen)),
        "pooled": (ours(tokens)[1], ref_pooled),
    }
    errors = {name: rel_err(a, b.detach()) for name, (a, b) in cases.items()}
    print(f"\n{ours.config.name} ({ours.config.hidden_act}) max|d|/max|ref|: {errors}")
    return errors


@pytest.mark.parametrize("which", ["clip_l", "clip_h", "clip_g"])
def test_outputs_match_transformers(which, request):
    sd, ours = request.getfixturevalue(which)
    c = ours.config
    ref = reference_model(c)
    if c.key_format == "hf":
        file = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
        load_reference(ref, convert_ldm_clip_checkpoint(file))
    else:  # ViT-H too: this prefix keeps every block (the SD2 one drops the last, see below)
        file = {SDXL_G_PREFIX + k: v for k, v in sd.items()}
        load_reference(ref, convert_open_clip_checkpoint(ref, file, SDXL_G_PREFIX))
    errors = parity(ours, ref, tokens_batch(c))
    assert max(errors.values()) <= TOL, errors


def test_sd2_default_output_is_diffusers_sd2_text_encoder(clip_h):
    """Our CLIP_H default (penultimate layer + final norm) is what diffusers' 23-layer SD2 encoder returns."""
    sd, ours = clip_h
    ref = reference_model(SMALL_H, num_layers=SMALL_H.num_layers - 1, projection=False)
    load_reference(ref, convert_open_clip_checkpoint(ref, {SD2_PREFIX + k: v for k, v in sd.items()}, SD2_PREFIX))
    tokens = tokens_batch(SMALL_H)
    err = rel_err(ours(tokens)[0], ref(input_ids=tokens).last_hidden_state.detach())
    print(f"\nclip_h default vs diffusers SD2 encoder: {err:.2e}")
    assert err <= TOL


# ---------------------------------------------------------------- 3. full-size key sets (meta)

def meta_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_full_size_key_sets():
    with torch.device("meta"):
        assert set(ClipTextEncoder(CLIP_L).state_dict()) == set(hf_file_shapes(CLIP_L))
    assert len(hf_file_shapes(CLIP_L)) == 196  # SD1.5's cond_stage_model, without position_ids
    sd15 = meta_weights(hf_file_shapes(CLIP_L)) | {"text_model.embeddings.position_ids": torch.empty(1, 77)}
    assert len(ClipTextEncoder.from_state_dict(CLIP_L, sd15).state_dict()) == 196
    for config, file_keys, our_keys in ((CLIP_H, 294, 389), (CLIP_G, 390, 517)):
        file = meta_weights(openclip_file_shapes(config))
        assert len(file) == file_keys
        assert len(clip_keys.openclip_to_hf(file)) == our_keys
        model = ClipTextEncoder.from_state_dict(config, file)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == hf_file_shapes(config)


def test_key_table_round_trip(clip_g):
    sd, _ = clip_g
    back = clip_keys.hf_to_openclip(clip_keys.openclip_to_hf(sd))
    assert set(back) == set(sd) - {"logit_scale"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


# ---------------------------------------------------------------- 4. encode_token_weights

def chunk(tokens: torch.Tensor, weights: dict[int, float] | None = None) -> list[tuple[int, float]]:
    weights = weights or {}
    return [(int(t), weights.get(j, 1.0)) for j, t in enumerate(tokens)]


def test_unweighted_is_plain_forward(clip_l):
    _, enc = clip_l
    tokens = tokens_batch(SMALL_L)[1:2]
    cond, pooled = enc.encode_token_weights([chunk(tokens[0])])
    z, p = enc(tokens)
    assert cond.shape == (1, 77, SMALL_L.hidden_size) and cond.dtype == torch.float32
    assert torch.equal(cond, z) and torch.equal(pooled, p)


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_weight_interpolates_against_empty_chunk(which, request):
    _, enc = request.getfixturevalue(which)
    c = enc.config
    tokens = tokens_batch(c)[1]
    j, w = 7, 1.3
    cond, pooled = enc.encode_token_weights([chunk(tokens, {j: w})])
    empty = torch.tensor([START_TOKEN, END_TOKEN] + [c.pad_token] * (c.max_positions - 2))
    z, p = enc(torch.stack([tokens, empty]))
    expected = z[0].clone()
    expected[j] = (z[0, j] - z[1, j]) * w + z[1, j]  # ComfyUI's per-position formula, Python float weight
    assert torch.equal(cond[0], expected)
    assert not torch.equal(cond[0, j], z[0, j])
    assert torch.equal(pooled, p[:1])


def test_embedding_vector_replaces_token_embedding(clip_l):
    _, enc = clip_l
    tokens = tokens_batch(SMALL_L)[1]
    vector = torch.randn(SMALL_L.hidden_size, generator=torch.Generator().manual_seed(5))
    items = chunk(tokens)
    items[3] = (vector, 1.0)
    cond, pooled = enc.encode_token_weights([items])
    embeds = enc.text_model.embeddings.token_embedding(tokens[None]).clone()
    embeds[0, 3] = vector
    z, p = enc(tokens[None], embeds)
    assert torch.equal(cond, z) and torch.equal(pooled, p)
    plain, _ = enc(tokens[None])
    assert torch.equal(cond[0, :3], plain[0, :3])  # causal: positions before the vector are untouched
    assert not torch.allclose(cond[0, 3:], plain[0, 3:])
    # the embeds path itself is the token path when given the plain token embeddings
    assert torch.equal(enc(tokens[None], enc.text_model.embeddings.token_embedding(tokens[None]))[0], plain)


def test_two_chunks_concatenate_and_pool_from_first(clip_g):
    _, enc = clip_g
    tokens = tokens_batch(SMALL_G)
    cond, pooled = enc.encode_token_weights([chunk(tokens[0]), chunk(tokens[1])])
    z, p = enc(tokens[:2])
    assert cond.shape == (1, 154, SMALL_G.hidden_size)
    assert torch.equal(cond[0, :77], z[0]) and torch.equal(cond[0, 77:], z[1])
    assert torch.equal(pooled, p[:1]) and pooled.shape == (1, SMALL_G.projection_dim)


def test_pooled_position_first_end_token_else_last(clip_g):
    """Pooled = projection of the normed last layer at the first end token, else at the last position."""
    _, enc = clip_g
    tokens = tokens_batch(SMALL_G)[1:2].clone()  # end token at 33, padding 0 after it
    last = enc(tokens, layer_idx=None)[0]
    assert torch.allclose(enc(tokens)[1], enc.text_projection(last[:, 33]))
    tokens[0, 40] = END_TOKEN  # a later end token does not move it
    assert torch.allclose(enc(tokens)[1], enc.text_projection(enc(tokens, layer_idx=None)[0][:, 33]))
    tokens[tokens == END_TOKEN] = 1  # none at all: ComfyUI's last position (transformers would take 0)
    assert torch.allclose(enc(tokens)[1], enc.text_projection(enc(tokens, layer_idx=None)[0][:, -1]))


def test_no_chunks_encodes_the_empty_chunk(clip_l):
    _, enc = clip_l
    cond, pooled = enc.encode_token_weights([])
    z, p = enc(torch.tensor([enc.empty_chunk()]))
    assert torch.equal(cond, z) and torch.equal(pooled, p)


def test_layer_selection_follows_comfyui(clip_l):
    _, enc = clip_l
    tokens = tokens_batch(SMALL_L)
    n = SMALL_L.num_layers
    last = enc(tokens, layer_idx=None)[0]
    assert torch.equal(enc(tokens, layer_idx=-n - 1, layer_norm_hidden_state=False)[0], last)  # out of range
    assert torch.equal(enc(tokens, layer_idx=-1)[0], last)  # -1 with the norm is the default
    assert torch.equal(enc(tokens, layer_idx=0)[0], enc(tokens, layer_idx=-n)[0])  # first layer's output
    with pytest.raises(ConfigError):
        enc(tokens, layer_idx=n)
    cond, _ = enc.encode_token_weights([chunk(tokens[0])], layer_idx=-2)
    assert torch.equal(cond[0], enc(tokens[:1], layer_idx=-2)[0][0])


def test_wrong_width_embedding_is_refused(clip_l):
    _, enc = clip_l
    items = chunk(tokens_batch(SMALL_L)[0])
    items[2] = (torch.zeros(SMALL_L.hidden_size + 1), 1.0)
    with pytest.raises(PromptError, match="width"):
        enc.encode_token_weights([items])


def test_sdxl_set_concatenates_l_and_g():
    l_sd = random_weights(hf_file_shapes(SMALL_L_XL), seed=6)
    g_sd = random_weights(openclip_file_shapes(SMALL_G), seed=7)
    encoders = TextEncoderSet.from_state_dicts((SMALL_L_XL, SMALL_G), (l_sd, g_sd))
    l, g = encoders.encoders["clip_l"], encoders.encoders["clip_g"]
    t_l, t_g = tokens_batch(SMALL_L_XL), tokens_batch(SMALL_G)
    chunks = {"clip_l": [chunk(t_l[0], {5: 0.8}), chunk(t_l[1])], "clip_g": [chunk(t_g[0], {5: 0.8})]}
    cond, pooled = encoders.encode_token_weights(chunks)
    assert cond.shape == (1, 77, SMALL_L_XL.hidden_size + SMALL_G.hidden_size)  # cut to the shorter (g)
    l_cond, _ = l.encode_token_weights(chunks["clip_l"])
    g_cond, g_pooled = g.encode_token_weights(chunks["clip_g"])
    assert torch.equal(cond, torch.cat([l_cond[:, :77], g_cond], dim=-1))
    assert torch.equal(pooled, g_pooled)
    skip = encoders.encode_token_weights(chunks, layer_idx=-1)[0]  # CLIPSetLastLayer applies to both
    assert torch.equal(skip[..., : SMALL_L_XL.hidden_size], l.encode_token_weights(chunks["clip_l"], -1)[0][:, :77])


# ---------------------------------------------------------------- 5. strict loading

def test_hf_layout_variants_load_identically(clip_l):
    sd, ours = clip_l
    legacy = {k.removeprefix("text_model."): v for k, v in sd.items()} | {"embeddings.position_ids": torch.zeros(1, 77)}
    other = ClipTextEncoder.from_state_dict(SMALL_L, legacy)
    tokens = tokens_batch(SMALL_L)
    assert torch.equal(other(tokens)[0], ours(tokens)[0])


@pytest.mark.parametrize(
    "config, key, value",  # value None: the key is deleted
    [
        (SMALL_L, "text_model.encoder.layers.3.mlp.fc1.bias", None),
        (SMALL_L, "text_model.extra.weight", torch.zeros(1)),
        (SMALL_L, "text_projection.weight", torch.zeros(48, 48)),  # SD1 CLIP-L has no projection
        (SMALL_L, "text_model.final_layer_norm.weight", torch.zeros(7)),
        (SMALL_G, "transformer.resblocks.5.attn.in_proj_weight", None),
        (SMALL_G, "text_projection", None),
        (SMALL_G, "visual.proj", torch.zeros(1)),
        (SMALL_G, "positional_embedding", torch.zeros(76, SMALL_G.hidden_size)),
    ],
)
def test_strict_loading_names_the_key(config, key, value):
    """Errors name keys as the file spells them (HF: with the `text_model.` level; OpenCLIP: its own names)."""
    shapes = hf_file_shapes(config) if config.key_format == "hf" else openclip_file_shapes(config)
    sd = meta_weights(shapes)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    with pytest.raises(StateDictMismatchError, match=key.replace(".", r"\.")):
        ClipTextEncoder.from_state_dict(config, sd)


def test_logit_scale_is_optional():
    sd = meta_weights(openclip_file_shapes(SMALL_G))
    del sd["logit_scale"]
    ClipTextEncoder.from_state_dict(SMALL_G, sd)
