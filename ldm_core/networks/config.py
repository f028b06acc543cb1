"""Frozen architecture configs for every model part.

Each config is fixed at construction, round-trips through a plain dict (JSON-safe),
and rejects unknown keys loudly. Presets for the named checkpoint families live in
`presets.py`; `checkpoints/model_family.py` fills these from a checkpoint's tensor shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ldm_core.errors import ConfigError

C = TypeVar("C", bound="_Config")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn JSON-ish `value` into the annotated type `tp` (tuples from lists, nested configs)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, where) for v in value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if isinstance(tp, type) and issubclass(tp, _Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return tp.from_dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


class _Config:
    """Mixin: dict round trip with strict keys."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, _Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, _Config) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
        kwargs = {k: _coerce(hints[k], v, f"{cls.__name__}.{k}") for k, v in d.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class UNetConfig(_Config):
    """The LDM/SGM time-conditional UNet (openaimodel layout).

    Levels: one per entry of `channel_mult`. `transformer_depth[i]` is the number of
    transformer blocks in each SpatialTransformer of level i on the input and output
    side (0: no attention at that level); the middle block has
    `transformer_depth_middle` (or, if negative, no transformer at all).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int | None = 768
    num_heads: int = 8  # used when num_head_channels == -1
    num_head_channels: int = -1  # SD2/SDXL: 64 channels per head
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL "sequential" label embedding input width
    num_classes: int | None = None  # class-conditional LDMs: nn.Embedding(num_classes, time_embed_dim)
    norm_groups: int = 32
    # > 0: an additive spatial path from the context (`context_map.*`, see unet.ContextMap): every
    # context token → a [context_map_channels, G, G] map through a small MLP, pooled over the tokens
    # (the mean, or gated: see context_map_gate), upsampled to the latent and added to the stem's
    # output by a zero-initialised 1×1 convolution.
    context_map_grid: int = 0
    context_map_channels: int = 16
    # True: the map pools its tokens with learned weights (`context_map.gate.*`, per channel a
    # softmax over the tokens, zero-initialised: the plain mean until it learns) instead of the mean.
    context_map_gate: bool = False

    def __post_init__(self) -> None:
        if self.context_map_grid > 0 and self.context_dim is None:
            raise ConfigError("UNetConfig: context_map_grid needs a context_dim")
        if self.context_map_gate and self.context_map_grid == 0:
            raise ConfigError("UNetConfig: context_map_gate needs a context map (context_map_grid > 0)")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ConfigError("UNetConfig: transformer_depth needs one entry per channel_mult level")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("UNetConfig: set num_heads or num_head_channels")
        if any(d > 0 for d in self.transformer_depth) and self.context_dim is None:
            raise ConfigError("UNetConfig: transformer blocks need a context_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of an attention layer of width `channels`."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


@dataclass(frozen=True)
class VAEConfig(_Config):
    """AutoencoderKL (first stage). Downsampling factor f = 2 ** (len(ch_mult) - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig(_Config):
    """A CLIP text transformer and how a checkpoint stores it and SD uses it.

    `key_format`: "hf" (transformers CLIPTextModel keys, SD1 / SDXL CLIP-L) or
    "openclip" (SD2 ViT-H, SDXL bigG). `layer_idx`: None = last layer with the final
    LayerNorm; a negative index k = hidden state after layer n+k+1 (-1 last, -2
    penultimate), final LayerNorm applied only if `layer_norm_hidden_state`.
    `pad_token`: what fills a 77-token chunk after the end token (49407 for
    OpenAI CLIP-L, 0 for OpenCLIP models), as the original models were trained.
    """

    name: str = "clip_l"
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    projection_dim: int | None = None  # pooled text projection (SDXL bigG: 1280)
    key_format: Literal["hf", "openclip"] = "hf"
    layer_idx: int | None = None
    layer_norm_hidden_state: bool = True
    pad_token: int = 49407


@dataclass(frozen=True)
class ScheduleConfig(_Config):
    """Discrete DDPM noise schedule of the diffusion model (betas over T steps).

    "scaled_linear" is Stable Diffusion's (linear in sqrt space), what the original
    configs call "linear"; "linear" is DDPM's linear in beta.
    """

    beta_schedule: Literal["scaled_linear", "linear", "cosine"] = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class LayoutEncoderConfig(_Config):
    """τθ for box layouts (`layout.LayoutEncoder`): a pre-norm transformer encoder over
    3·max_objects tokens. Defaults are the LDM layout2img models (vocab 8192, 30 objects,
    512 wide, 16 layers, 92 positions). `classes`: the model's class names by id, when
    the checkpoint carries its vocabulary (the embedded model does)."""

    vocab_size: int = 8192
    num_classes: int = 601
    max_objects: int = 30
    max_seq_len: int = 92
    dim: int = 512
    depth: int = 16
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    classes: tuple[str, ...] = ()
    # > 0: each object's class token also gets a Fourier embedding of its box, read from its two
    # corner tokens (`transformer.box_emb`, zero-initialised; 0 is the paper's encoder).
    box_features: int = 0

    def __post_init__(self) -> None:
        if self.box_features < 0:
            raise ConfigError(f"LayoutEncoderConfig: box_features must be 0 or more, got {self.box_features}")
        if self.num_classes > self.vocab_size - 1:
            raise ConfigError(f"LayoutEncoderConfig: num_classes {self.num_classes} must be below vocab_size − 1 = "
                              f"{self.vocab_size - 1}")
        if 3 * self.max_objects > self.max_seq_len:
            raise ConfigError(f"LayoutEncoderConfig: max_seq_len {self.max_seq_len} is shorter than 3 × max_objects "
                              f"= {3 * self.max_objects}")
        if self.grid < 2 or self.grid**2 > self.pad_token:
            raise ConfigError(f"LayoutEncoderConfig: vocab_size {self.vocab_size}: the {self.grid}² grid tokens must "
                              f"stay below the pad token {self.pad_token}; use a vocab_size of at least 5 that is not "
                              "a perfect square")
        if self.classes and len(self.classes) != self.num_classes:
            raise ConfigError(f"LayoutEncoderConfig: {len(self.classes)} class names for num_classes "
                              f"{self.num_classes}")

    @property
    def grid(self) -> int:
        return math.isqrt(self.vocab_size)

    @property
    def pad_token(self) -> int:
        return self.vocab_size - 1

    @property
    def seq_len(self) -> int:
        return 3 * self.max_objects


@dataclass(frozen=True)
class ModelConfig(_Config):
    """Everything a single-file checkpoint holds: which family, and each part's config."""

    family: str = "sd1"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoders: tuple[TextEncoderConfig, ...] = (TextEncoderConfig(),)
    prediction: Literal["eps", "v"] = "eps"
    latent_scale: float = 0.18215
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # SDXL: the label embedding is [pooled text, fourier(size/crop/target or aesthetic score)]
    adm: Literal["none", "sdxl", "sdxl_refiner"] = "none"
    # Layout-to-image: a box-layout encoder whose tokens the UNet's cross-attention also reads
    # (weights under `layout_stage_model.`); None for text-only models.
    layout: LayoutEncoderConfig | None = None
    # The UNet input also carries two coordinate channels, x and y running −1 → 1 across the
    # latent (CoordConv, Liu et al. 2018), appended after the latent (and any concat input):
    # cross-attention can then tie position words and boxes to places. unet.in_channels counts them.
    coord_channels: bool = False
