"""Stage 2, latent diffusion: a cross-attention UNet and a CLIP-architecture text encoder
trained jointly from scratch on the frozen autoencoder's scaled latents.

Per step (Ho et al. 2020; Rombach et al. 2022, eq. 2):
    z0 = s·z, z ~ q(z|x) of the frozen first stage, s = latent_scale (1 / std of z,
         measured once on training scenes before step 0, as Stable Diffusion's 0.18215 was)
    t ~ U{0, …, T−1}, ε ~ N(0, I), z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε
    y = caption, replaced by "" with probability p_uncond (classifier-free guidance)
    L = mean ‖ε − ε_θ(z_t, t, τ_θ(y))‖²   (or, with prediction "v", ‖v − v_θ‖² for
        v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·z0, Salimans & Ho 2022)
EMA copies of the UNet and text encoder are what is exported and sampled.

τ_θ is the engine's `ClipTextEncoder` (so the weights load unchanged) run through
`encode_text`, a differentiable copy of its inference forward for the last layer
after the final LayerNorm; prompts are tokenized exactly as at inference.

Layout-to-image (the paper's bounding-box tokens, §4.3): with `config.layout` set, a
box-layout encoder (`ldm_core.layout.LayoutEncoder`: class token and two quantised
corners per object) is trained jointly, and the last `layout_fraction` of every batch
is conditioned on [τθ(text) ; τθ(layout)], the two token sequences concatenated along
the sequence axis so the same cross-attention reads both; its caption is kept with
probability `layout_caption_prob`, else "". The rest of the batch sees text alone (77
tokens, with classifier-free dropout), so text-only inference is exactly what was
trained, and layout inference is ConditioningConcat(text, layout) against the "" prompt.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ldm_core.conditioning.layout import LayoutEncoder, tokenize_layout
from ldm_core.lab.scenes import COLOUR_NAMES, NUM_CLASSES, SHAPES, Scene, SceneConfig, class_id
from ldm_core.lab.train.ema import EMA
from ldm_core.lab.train.loop import Stage, cosine_lr, image_grid, seeded
from ldm_core.lab.train.scene_batches import heldout_batch, scene_batch, scene_config_from_dict, scene_config_to_dict
from ldm_core.lab.train.state import load_weights, read_state, sub_state
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.clip_text import ClipTextEncoder
from ldm_core.networks.config import (
    LayoutEncoderConfig,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    _Config,
)
from ldm_core.networks.unet import UNetModel
from ldm_core.sampling.denoiser import with_coordinates
from ldm_core.sampling.schedule import alphas_cumprod
from ldm_core.text.prompt_syntax import tokenize_with_weights
from ldm_core.text.tokenizer import ClipTokenizer

SCENES_TEXT = TextEncoderConfig(
    name="clip_scenes", hidden_size=64, num_layers=2, num_heads=1, intermediate_size=256, vocab_size=49408,
    max_positions=77, hidden_act="quick_gelu", projection_dim=None, key_format="hf", layer_idx=None,
    layer_norm_hidden_state=True, pad_token=49407,
)
SCENES_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
    transformer_depth=(1, 1, 1), transformer_depth_middle=1, context_dim=64, num_heads=-1, num_head_channels=32,
    use_linear_in_transformer=True,
)
# Layout classes by id: class_id(colour, shape) − 1 (scenes.py numbers them from 1; 0 is background there).
LAYOUT_CLASSES = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
SCENES_LAYOUT = LayoutEncoderConfig(
    vocab_size=258, num_classes=len(LAYOUT_CLASSES), max_objects=3, max_seq_len=9, dim=64, depth=2, heads=2,
    dim_head=32, ff_mult=4, classes=LAYOUT_CLASSES,
)  # a 16 × 16 corner grid (4-pixel cells on 64² scenes); token 257 pads
SAMPLE_PROMPTS = (
    "a red circle in the top left", "a blue square at the bottom", "a yellow triangle in the center",
    "a green circle on the right", "a red square left of a blue circle", "a yellow circle above a green triangle",
    "a blue triangle in the top right and a red circle in the bottom left", "a green square below a yellow square",
)


@dataclass(frozen=True)
class DiffusionTrainConfig(_Config):
    unet: UNetConfig = field(default_factory=lambda: SCENES_UNET)
    text: TextEncoderConfig = field(default_factory=lambda: SCENES_TEXT)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Literal["eps", "v"] = "eps"
    coord_channels: bool = False  # the UNet also reads x/y coordinate channels (unet.in_channels counts them)
    batch_size: int = 32
    lr: float = 1e-3
    lr_warmup: int = 100  # linear warm-up steps, then a cosine decay to lr_final at lr_steps
    lr_steps: int = 2800
    lr_final: float = 5e-5
    weight_decay: float = 0.0
    uncond_prob: float = 0.1
    layout: LayoutEncoderConfig | None = field(default_factory=lambda: SCENES_LAYOUT)
    layout_fraction: float = 0.25  # of each batch, conditioned on text + layout tokens
    layout_caption_prob: float = 0.5  # those keep their caption with this probability, else ""
    ema_decay: float = 0.995
    snr_gamma: float = 0.0  # > 0: min-SNR-γ loss weights min(SNR_t, γ) / SNR_t (Hang et al. 2023); 0: plain ε loss
    # > 0: the loss also carries the x0 error of the noisy steps, truncated: each step's weight gains
    # min(x0-MSE / prediction-MSE, x0_weight_max), i.e. min(1/SNR_t, ·) for ε and min(1/(1 + SNR_t), ·) for v.
    # Where the picture is still mostly noise (where the words must decide the layout) the ε-loss
    # barely sees x0 at all (it weighs the x0 error by SNR_t).
    x0_weight_max: float = 0.0
    # > 0 (needs unet.context_map_grid): channels 1 … NUM_CLASSES − 1 of the context map also learn,
    # with this weight, where each class the scene holds lies: per class, a softmax over the G×G
    # cells against the class's share of coverage per cell (cross-entropy; `map_cross_entropy`).
    # The words and boxes get a direct, noise-free lesson in *where*, which the denoiser then
    # reads through the map. (A squared error on the occupancy itself barely moved: a small
    # object's place is a tiny part of that error.)
    map_loss: float = 0.0
    context_map_lr_mult: float = 1.0  # the context map's learning rate relative to the rest
    # > 0: the map loss scores the map upsampled (bilinear, as the UNet adds it) to this size, against
    # the coverage at this size; 0: at the map's own grid. The latent's size asks for sub-cell places.
    map_loss_size: int = 0
    data_seed: int = 0
    init_seed: int = 1
    latent_scale_scenes: int = 256  # training scenes whose latents set the scale


# The shipped stage 2 (`ldm-train stage2`): every lesson of the position and layout probes from
# step 0, in one run on one cosine (docs/embedded-model.md, "How it was trained", has the probes):
# - the UNet's context map (`UNetConfig.context_map_grid`): every context token (prompt or box)
#   through a small MLP to a coarse 16×8×8 map, pooled over the tokens with learned per-channel
#   weights (`context_map_gate`; the mean would drown a layout's 9 box tokens in the 77 of its ""
#   prompt) and added to the UNet's first features; 16 channels ≥ NUM_CLASSES for the map loss;
# - each box's Fourier embedding on its class token (`LayoutEncoderConfig.box_features`);
# - min-SNR-5 weights plus the truncated x0 error of the noisy steps (where the words must decide
#   the layout), and the map's class-placement loss scored at the latent's 16×16;
# - 1/4 of every batch a layout, and most scenes with two objects (STAGE2_SCENES below): binding
#   colour to shape, and one object to one place, is what two-object prompts miss (3/8 layouts
#   and 40% two objects reached 0.62 on the bench's two-object prompts at 4,000 steps).
STAGE2_UNET = dict(context_map_grid=8, context_map_channels=16, context_map_gate=True)
STAGE2_LAYOUT = dict(box_features=6)
STAGE2 = dict(lr=1e-3, lr_warmup=100, lr_steps=4800, lr_final=1e-5, snr_gamma=5.0, x0_weight_max=25.0, map_loss=0.2,
              map_loss_size=16, context_map_lr_mult=3.0, layout_fraction=0.25, ema_decay=0.998)
# Scenes of 1 / 2 / 3 objects at 0.15 / 0.75 / 0.1, and 2 of every 3 multi-object captions lead with a
# relation ("a red circle left of a blue square"): probe 3's two-object misses were mostly relation
# prompts drawn with an extra copy of one object (19 of its 32 misses).
STAGE2_SCENES = SceneConfig(count_weights=(0.15, 0.75, 0.1), relation_prob=2 / 3)


def stage2_config(seed: int) -> DiffusionTrainConfig:
    """The shipped stage 2's config; `seed` sets its data stream and initial weights."""
    return DiffusionTrainConfig(unet=SCENES_UNET.replace(**STAGE2_UNET), layout=SCENES_LAYOUT.replace(**STAGE2_LAYOUT),
                                data_seed=seed, init_seed=seed, **STAGE2)


# Polish: stage 2 trained on from its weights, EMA weights and latent scale, with a fresh AdamW and a
# short cosine from a lower rate (new data: its own seed); everything else as STAGE2.
POLISH = dict(lr=3e-4, lr_warmup=50, lr_steps=1000)


def polish_config(seed: int) -> DiffusionTrainConfig:
    """The polish stage's config: `stage2_config` with the POLISH schedule."""
    return stage2_config(seed).replace(**POLISH)


def as_shipped(autoencoder: AutoencoderKL, dtype: torch.dtype = torch.float16) -> AutoencoderKL:
    """The autoencoder with its weights rounded to the dtype it ships in (kept float32): stage 2 then
    learns the very latents, and latent scale, that the exported file's encoder gives."""
    with torch.no_grad():
        for t in list(autoencoder.parameters()) + list(autoencoder.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return autoencoder


def encode_text(encoder: ClipTextEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """Differentiable τ_θ: tokens [B, L] → normed last hidden state [B, L, D].

    Same arithmetic as `ClipTextEncoder.forward` with layer_idx None (token plus
    position embedding, causal self-attention layers, final LayerNorm), which is
    decorated no_grad for inference and so cannot be trained through.
    """
    tm = encoder.text_model
    length = tokens.shape[1]
    x = tm.embeddings.token_embedding(tokens) + tm.embeddings.position_embedding.weight[:length]
    causal = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu_(1)
    for layer in tm.encoder.layers:
        x = layer(x, causal[None, None])
    return tm.final_layer_norm(x)


class PromptTokens:
    """Caption → the 77 token ids of its first chunk, as the engine tokenizes prompts (cached)."""

    def __init__(self, config: TextEncoderConfig, tokenizer: ClipTokenizer | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer or ClipTokenizer()
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            if c not in self.cache:
                chunks = tokenize_with_weights(c, self.tokenizer, pad_token=self.config.pad_token,
                                               max_length=self.config.max_positions, disable_weights=True)
                if len(chunks) != 1:
                    raise ValueError(f"caption {c!r} needs {len(chunks)} chunks; training captions must fit one")
                self.cache[c] = [int(tok) for tok, _ in chunks[0]]
            rows.append(self.cache[c])
        return torch.tensor(rows, dtype=torch.long)


def scene_layout(scene: Scene) -> list[tuple[int, tuple[float, float, float, float]]]:
    """A scene's objects as (layout class id, box as fractions x0 y0 x1 y1)."""
    n = scene.image.shape[0]
    return [(class_id(o.colour, o.shape) - 1, tuple(v / n for v in o.bbox)) for o in scene.objects]


def layout_tokens(config: LayoutEncoderConfig, scenes: Sequence[Scene]) -> torch.Tensor:
    return torch.stack([tokenize_layout(config, scene_layout(s)) for s in scenes])


def occupancy(scenes: Sequence[Scene], grid: int) -> torch.Tensor:
    """[B, NUM_CLASSES, grid, grid]: the share of each grid cell each class (0: background) covers."""
    semantic = torch.from_numpy(np.stack([s.semantic for s in scenes]))
    one_hot = F.one_hot(semantic, NUM_CLASSES).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, grid)


def map_cross_entropy(grid_map: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """Summed over the (sample, class) pairs present: −Σ_cells q·log softmax(logits), where the logits
    are channel k of `grid_map` [B, C, G, G] over its cells and q is class k's coverage in `occ`
    [B, NUM_CLASSES, G, G] normalised to sum 1 (classes 1 …; background is not placed)."""
    logp = torch.log_softmax(grid_map[:, 1:NUM_CLASSES].flatten(2), dim=-1)
    q = occ[:, 1:].flatten(2)
    mass = q.sum(-1, keepdim=True)
    present = (mass > 0).squeeze(-1)
    return -((q / mass.clamp(min=1e-12)) * logp).sum(-1)[present].sum()


def build_layout_encoder(config: LayoutEncoderConfig, seed: int) -> LayoutEncoder:
    return seeded(LayoutEncoder, config, seed)


def build_text_encoder(config: TextEncoderConfig, seed: int) -> ClipTextEncoder:
    return seeded(ClipTextEncoder, config, seed).requires_grad_(True)


def build_unet(config: UNetConfig, seed: int) -> UNetModel:
    return seeded(UNetModel, config, seed)


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """A single-file checkpoint written by `export_checkpoint`: its config (from the metadata), tensors, metadata."""
    from ldm_core.checkpoints.model_family import CONFIG_METADATA_KEY, config_from_metadata
    from ldm_core.checkpoints.weights_file import read_weights

    wf = read_weights(path)
    config = config_from_metadata(wf.metadata)
    if config is None:
        raise ValueError(f"{path}: carries no {CONFIG_METADATA_KEY} metadata; training can start only from a "
                         "checkpoint this project exported (ldm-train export)")
    return config, wf.tensors, wf.metadata


def checkpoint_autoencoder(path: str | Path) -> tuple[AutoencoderKL, VAEConfig]:
    """The (frozen, float32) autoencoder of an exported single-file checkpoint."""
    from ldm_core.checkpoints.weights_file import VAE_PREFIX

    config, tensors, _ = read_checkpoint(path)
    ae = AutoencoderKL.from_state_dict(config.vae, sub_state(tensors, VAE_PREFIX), torch.float32)
    return ae.eval().requires_grad_(False), config.vae


def load_stage1(folder: str | Path) -> tuple[AutoencoderKL, VAEConfig]:
    """The trained first stage from a stage-1 run folder, frozen."""
    tensors, doc = read_state(Path(folder))
    if doc.get("stage") != "autoencoder":
        raise ValueError(f"{folder} is a {doc.get('stage')!r} run; stage 2 needs the folder of a stage-1 (autoencoder) run")
    vae_config = VAEConfig.from_dict(doc["config"]["vae"])
    ae = AutoencoderKL.from_state_dict(vae_config, sub_state(tensors, "model.ae."), torch.float32)
    return ae.eval().requires_grad_(False), vae_config


class DiffusionStage(Stage):
    name = "diffusion"

    def __init__(self, folder: str | Path, autoencoder: AutoencoderKL, config: DiffusionTrainConfig = DiffusionTrainConfig(),
                 scenes: SceneConfig = SceneConfig(), init: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        """`init`: a finished diffusion run folder to continue from (its weights, EMA weights and
        latent scale; a fresh optimizer and learning-rate schedule from this config), or an exported
        single-file checkpoint (`.safetensors`; its weights start both the model and the EMA). The
        architecture must match, except that this config may add what starts at zero effect: input
        channels, the context map's gate or the layout encoder's box features (from a run folder) or
        the UNet's context map (from a file); the noise schedule and prediction may change (a
        fine-tune onto them).

        `device`: where the networks train ("cuda" on a GPU). Scenes and every random draw (noise,
        timesteps, dropout) still come from the CPU generator, so a run sees the same data and
        noise on any device; only the arithmetic differs. The saved state is device-free."""
        super().__init__(folder, config.init_seed)
        if config.coord_channels and config.unet.in_channels != config.unet.out_channels + 2:
            raise ValueError(f"DiffusionTrainConfig: with coord_channels, unet.in_channels must be the latent's "
                             f"{config.unet.out_channels} + 2, not {config.unet.in_channels}")
        if config.map_loss > 0 and (config.unet.context_map_grid == 0 or config.unet.context_map_channels < NUM_CLASSES):
            raise ValueError(f"DiffusionTrainConfig: map_loss needs unet.context_map_grid > 0 and "
                             f"context_map_channels ≥ {NUM_CLASSES} (one per scene class and background)")
        if config.unet.context_dim != config.text.hidden_size:
            raise ValueError(f"DiffusionTrainConfig: unet.context_dim ({config.unet.context_dim}) must equal "
                             f"text.hidden_size ({config.text.hidden_size})")
        self.config, self.scenes = config, scenes
        self.device = torch.device(device)
        self.ae = autoencoder.eval().requires_grad_(False).to(self.device)
        self.unet = build_unet(config.unet, config.init_seed).to(self.device)
        self.text = build_text_encoder(config.text, config.init_seed + 1).to(self.device)
        self.modules.update(unet=self.unet, text=self.text)
        self.layout: LayoutEncoder | None = None
        if config.layout is not None:
            if config.layout.dim != config.text.hidden_size:
                raise ValueError(f"DiffusionTrainConfig: layout.dim ({config.layout.dim}) must equal text.hidden_size "
                                 f"({config.text.hidden_size}): both feed the same cross-attention")
            self.layout = build_layout_encoder(config.layout, config.init_seed + 2).to(self.device)
            self.modules["layout"] = self.layout
        params = [p for m in self.modules.values() for p in m.parameters()]
        groups: list[dict] = [{"params": params, "lr_mult": 1.0}]
        if config.context_map_lr_mult != 1.0 and self.unet.context_map is not None:
            own = {id(p) for p in self.unet.context_map.parameters()}
            groups = [{"params": [p for p in params if id(p) not in own], "lr_mult": 1.0},
                      {"params": list(self.unet.context_map.parameters()), "lr_mult": config.context_map_lr_mult}]
        self.optimizers["main"] = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.emas = {name: EMA(m, config.ema_decay) for name, m in self.modules.items()}
        self.tokens = PromptTokens(config.text)
        abar = alphas_cumprod(config.schedule)
        self.sqrt_abar, self.sqrt_one_minus_abar = abar.sqrt().float().to(self.device), (1 - abar).sqrt().float().to(self.device)
        snr = abar / (1 - abar)
        if config.snr_gamma > 0:  # min-SNR-γ on the x0 error: ε-loss · min(SNR, γ)/SNR, v-loss · min(SNR, γ)/(SNR + 1)
            self.loss_weight = (snr.clamp(max=config.snr_gamma) / (snr + (config.prediction == "v"))).float()
        else:
            self.loss_weight = torch.ones_like(snr).float()
        if config.x0_weight_max > 0:
            self.loss_weight += (1 / (snr + (config.prediction == "v"))).clamp(max=config.x0_weight_max).float()
        self.loss_weight = self.loss_weight.to(self.device)
        self.latent_scale: float | None = None
        self.init_steps = 0  # steps of the run(s) this one continues
        self.init_file: str | None = None  # the exported checkpoint this run started from, if any
        if init is not None:
            init = Path(init)
            if init.is_file():
                self._init_from_checkpoint(init)
                self.init_file = str(init)
            else:
                self._continue_from(init)

    def _init_from_checkpoint(self, path: Path) -> None:
        from ldm_core.checkpoints.model_family import text_prefixes
        from ldm_core.checkpoints.weights_file import LAYOUT_PREFIX, UNET_PREFIX

        config, tensors, metadata = read_checkpoint(path)
        unet = self.config.unet
        base = config.unet.replace(context_map_grid=unet.context_map_grid, context_map_channels=unet.context_map_channels)
        if (base, config.text_encoders, config.layout) != (unet, (self.config.text,), self.config.layout):
            raise ValueError(f"{path}: its model architecture differs from this config; cannot start from it")
        if config.unet.context_map_grid and config.unet != unet:
            raise ValueError(f"{path}: its context map differs from this config's; cannot start from it")

        def take(module: torch.nn.Module, prefix: str, may_lack: str | None = None) -> None:
            sd = {k: v.float() for k, v in sub_state(tensors, prefix).items()}
            missing, unexpected = module.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not (may_lack and k.startswith(may_lack))]
            if missing or unexpected:
                raise ValueError(f"{path}: weights under {prefix!r} do not fit: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")

        take(self.unet, UNET_PREFIX, "context_map." if not config.unet.context_map_grid else None)
        take(self.text, text_prefixes(config)[0])
        if self.layout is not None:
            take(self.layout, LAYOUT_PREFIX)
        self.emas = {name: EMA(m, self.config.ema_decay) for name, m in self.modules.items()}
        self.latent_scale = float(config.latent_scale)
        self.init_steps = int(json.loads(metadata.get("ldm_core.train_steps", "{}")).get("diffusion", 0))

    def _continue_from(self, folder: Path) -> None:
        tensors, doc = read_state(folder)
        if doc.get("stage") != self.name:
            raise ValueError(f"{folder} is a {doc.get('stage')!r} run; continuing needs a diffusion run folder")
        saved = DiffusionTrainConfig.from_dict(doc["config"])
        unet, layout = self.config.unet, self.config.layout
        added = {}  # what this config may add: module → (saved config's value, this one's)
        if saved.unet.context_map_gate != unet.context_map_gate:
            added["unet"] = (saved.unet.context_map_gate, unet.context_map_gate)
        if saved.layout is not None and layout is not None and saved.layout.box_features != layout.box_features:
            added["layout"] = (saved.layout.box_features, layout.box_features)
        same_unet = saved.unet.replace(in_channels=unet.in_channels, context_map_gate=unet.context_map_gate)
        same_layout = saved.layout.replace(box_features=layout.box_features) if "layout" in added else saved.layout
        if (same_unet, saved.text, same_layout) != (unet, self.config.text, layout):
            raise ValueError(f"{folder}: its model architecture differs from this config; cannot continue")
        if saved.unet.in_channels > unet.in_channels or any(old for old, _ in added.values()):
            raise ValueError(f"{folder}: this config removes or changes a part of its model (input channels "
                             f"{saved.unet.in_channels} → {unet.in_channels}, additions {added}); parts can be "
                             "added, not removed or changed")
        for key in ("model.unet.input_blocks.0.0.weight", "ema.unet.input_blocks.0.0.weight"):  # new inputs: zero weights
            w = tensors[key]
            tensors[key] = torch.cat([w, w.new_zeros(w.shape[0], unet.in_channels - w.shape[1], *w.shape[2:])], 1)
        for name in added:  # the added parts start from this stage's (zero-effect) initial weights
            for key, value in self.modules[name].state_dict().items():
                for prefix in ("model", "ema"):
                    tensors.setdefault(f"{prefix}.{name}.{key}", value.detach().clone())
        load_weights(tensors, self.modules, self.emas)
        self.latent_scale = doc["latent_scale"]
        self.init_steps = int(doc["step"]) + int(doc.get("init_steps", 0))

    def info(self) -> dict:
        return {"config": self.config.to_dict(), "scenes": scene_config_to_dict(self.scenes),
                "latent_scale": self.latent_scale, "init_steps": self.init_steps, "init": self.init_file}

    def restore_info(self, doc: dict) -> None:
        if DiffusionTrainConfig.from_dict(doc["config"]) != self.config or scene_config_from_dict(doc["scenes"]) != self.scenes:
            raise ValueError(f"{self.folder}: the saved run used another config; resume with the same settings "
                             "or start in a new folder")
        self.latent_scale = doc["latent_scale"]
        self.init_steps = int(doc.get("init_steps", 0))

    @torch.no_grad()
    def measure_latent_scale(self) -> float:
        """1 / std of first-stage latent means over training scenes (a fixed set: deterministic)."""
        n = self.config.latent_scale_scenes
        x = scene_batch(self.config.data_seed, 0, n, self.scenes).images.to(self.device)
        z = torch.cat([self.ae.encode(x[i:i + 32]).mode() for i in range(0, n, 32)])
        return float(1.0 / z.float().std())

    def model_config(self, vae_config: VAEConfig) -> ModelConfig:
        if self.latent_scale is None:
            raise ValueError("the latent scale is measured at the first training step; train at least one step")
        return ModelConfig(family="scenes", unet=self.config.unet, vae=vae_config, text_encoders=(self.config.text,),
                           prediction=self.config.prediction, latent_scale=self.latent_scale, schedule=self.config.schedule,
                           coord_channels=self.config.coord_channels,
                           layout=self.config.layout)

    def context(self, captions: list[str], text: ClipTextEncoder, layout: LayoutEncoder | None = None,
                scenes: Sequence[Scene] = ()) -> torch.Tensor:
        """τθ(captions) [B, 77, D], followed by τθ(layout of `scenes`) [B, 3·max_objects, D] when a layout encoder is given."""
        ctx = encode_text(text, self.tokens(captions).to(self.device))
        if layout is not None:
            ctx = torch.cat([ctx, layout(layout_tokens(self.config.layout, scenes).to(self.device))], dim=1)
        return ctx

    def noised(self, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, the network's target): z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε; target ε, or
        v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·z0."""
        a, s = self.sqrt_abar[t].view(-1, 1, 1, 1), self.sqrt_one_minus_abar[t].view(-1, 1, 1, 1)
        return a * z0 + s * eps, (a * eps - s * z0 if self.config.prediction == "v" else eps)

    def predict(self, unet: UNetModel, zt: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The network on z_t, with the coordinate channels appended when the config has them."""
        return unet(with_coordinates(zt) if self.config.coord_channels else zt, t, ctx)

    def train_step(self, step: int) -> dict[str, float]:
        if self.latent_scale is None:
            self.latent_scale = self.measure_latent_scale()
        g = self.generator
        batch = scene_batch(self.config.data_seed, step, self.config.batch_size, self.scenes)
        dev = self.device
        with torch.no_grad():
            z0 = self.ae.encode(batch.images.to(dev)).sample(g) * self.latent_scale
        b = z0.shape[0]
        n_layout = round(b * self.config.layout_fraction) if self.layout is not None else 0
        drop = torch.rand(b, generator=g) < self.config.uncond_prob
        keep = torch.rand(b, generator=g) < self.config.layout_caption_prob
        t = torch.randint(0, self.config.schedule.timesteps, (b,), generator=g).to(dev)
        eps = torch.randn(z0.shape, generator=g).to(dev)
        zt, target = self.noised(z0, t, eps)
        n_text = b - n_layout
        # text alone (classifier-free dropout to ""), then text-or-"" with the layout tokens
        captions = ["" if d else c for d, c in zip(drop.tolist(), batch.captions)]
        w = self.loss_weight[t].view(-1, 1, 1, 1)

        grid = self.config.map_loss_size or self.config.unet.context_map_grid
        map_target = occupancy(batch.scenes, grid).to(dev) if self.config.map_loss > 0 else None
        map_err = []

        def weighted_sq_err(part: slice, ctx: torch.Tensor) -> torch.Tensor:
            if map_target is not None:
                grid_map = self.unet.context_map.grid_map(ctx)
                if grid != grid_map.shape[-1]:
                    grid_map = F.interpolate(grid_map, size=(grid, grid), mode="bilinear", align_corners=False)
                map_err.append(map_cross_entropy(grid_map, map_target[part]))
            return (w[part] * (self.predict(self.unet, zt[part], t[part], ctx) - target[part]).square()).sum()

        sq_err = weighted_sq_err(slice(0, n_text), self.context(captions[:n_text], self.text))
        if n_layout:
            captions = [c if k else "" for k, c in zip(keep.tolist()[n_text:], batch.captions[n_text:])]
            ctx = self.context(captions, self.text, self.layout, batch.scenes[n_text:])
            sq_err = sq_err + weighted_sq_err(slice(n_text, b), ctx)
        loss = sq_err / eps.numel()
        logs = {}
        if map_target is not None:
            present = int((map_target[:, 1:].flatten(2).sum(-1) > 0).sum())
            map_loss = sum(map_err) / max(present, 1)
            loss = loss + self.config.map_loss * map_loss
            logs["map_loss"] = map_loss.item()
        opt = self.optimizers["main"]
        c = self.config
        lr = cosine_lr(step - c.lr_warmup, c.lr, c.lr_final, c.lr_steps - c.lr_warmup)
        for group in opt.param_groups:
            group["lr"] = group.get("lr_mult", 1.0) * (lr * min(1.0, (step + 1) / c.lr_warmup) if c.lr_warmup else lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for name, ema in self.emas.items():
            ema.update(self.modules[name], step)
        return {"loss": loss.item(), **logs}

    @torch.no_grad()
    def validation_loss(self, count: int = 32, seed: int = 0, use_ema: bool = False) -> float:
        """Prediction (ε or v) loss on held-out scenes at `count` evenly spaced t, fixed noise: comparable across steps."""
        if self.latent_scale is None:
            self.latent_scale = self.measure_latent_scale()
        g = torch.Generator().manual_seed(seed)
        batch = heldout_batch(self.config.data_seed, count, self.scenes)
        z0 = self.ae.encode(batch.images.to(self.device)).mode() * self.latent_scale
        t = torch.linspace(0, self.config.schedule.timesteps - 1, count).round().long().to(self.device)
        eps = torch.randn(z0.shape, generator=g).to(self.device)
        zt, target = self.noised(z0, t, eps)
        unet = self.emas["unet"].module if use_ema else self.unet.eval()
        text = self.emas["text"].module if use_ema else self.text.eval()
        ctx = self.context(batch.captions, text)
        return F.mse_loss(self.predict(unet, zt, t, ctx), target).item()

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, cfg: float = 5.0,
               use_ema: bool = True, scenes: Sequence[Scene] | None = None) -> torch.Tensor:
        """Images [N, 3, H, W] in [−1, 1] for `prompts`, through the engine's sampler and guidance.
        With `scenes`, each prompt is followed by that scene's layout tokens (layout-to-image)."""
        from ldm_core.conditioning.cond import Cond
        from ldm_core.loading.model import DiffusionModel
        from ldm_core.pipeline.jobs import ksample
        from ldm_core.sampling.sampler_table import SAMPLERS

        unet = self.emas["unet"].module if use_ema else self.unet
        text = self.emas["text"].module if use_ema else self.text
        layout = (self.emas["layout"].module if use_ema else self.layout) if scenes is not None else None
        config = self.model_config(self.ae.config)
        model = DiffusionModel(unet.eval(), config, self.device, torch.float32)
        sampler = "dpmpp_2m" if "dpmpp_2m" in SAMPLERS else "euler"
        size = self.scenes.size // self.ae.config.downsample_factor
        uncond = Cond(context=self.context([""], text.eval()))
        out = []
        for i, prompt in enumerate(prompts):
            cond = Cond(context=self.context([prompt], text, layout and layout.eval(),
                                             [scenes[i]] if scenes is not None else ()))
            latent = torch.zeros(1, config.unet.out_channels, size, size)
            z = ksample(model, [cond], [uncond], latent, seed=seed + i, steps=steps, cfg=cfg, sampler=sampler)
            out.append(self.ae.decode(z.to(self.device)).cpu())
        return torch.cat(out)

    def write_samples(self, path: Path) -> None:
        rows = [self.sample(SAMPLE_PROMPTS)]
        if self.layout is not None:  # held-out scenes, and pictures from their layouts alone
            held = heldout_batch(self.config.data_seed, len(SAMPLE_PROMPTS), self.scenes)
            rows += [held.images, self.sample([""] * len(held.scenes), scenes=held.scenes)]
        image_grid(rows).save(path)
