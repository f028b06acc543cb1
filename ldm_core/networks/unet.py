"""The time-conditional UNet of latent diffusion (LDM / SGM "openaimodel" layout).

Module attribute paths equal the checkpoint keys under `model.diffusion_model.`:
`time_embed.{0,2}`, `label_emb`, `input_blocks.N.M`, `middle_block.M`,
`output_blocks.N.M`, `out.{0,2}`; so a single-file checkpoint loads with strict
key checking and no renaming table.

Layout, for levels i = 0..L-1 with width model_channels * channel_mult[i]:
input_blocks.0 is the stem convolution; then per level `num_res_blocks` blocks of
[ResBlock, SpatialTransformer if transformer_depth[i] > 0] and, except at the last
level, a Downsample block. The output side mirrors it with num_res_blocks + 1 blocks
per level, each taking the concatenated skip tensor, the last of each level (but
level 0) ending in an Upsample.

Optional `context_map` (config.context_map_grid > 0): an additive spatial path from the
context tokens to the stem's output (`ContextMap`), for small models trained from scratch
whose cross-attention is slow to learn where things go.

Middle block: ResBlock, SpatialTransformer(transformer_depth_middle), ResBlock.
A negative depth follows the released distilled SDXL variants: -1 is a middle block
of one ResBlock (`middle_block.0`, as SSD-1B and Segmind Vega ship it; diffusers
"UNetMidBlock2D"), -2 or less no middle block at all (KOALA, SD-XS).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.errors import ConfigError
from ldm_core.networks.attention import SpatialTransformer
from ldm_core.networks.config import UNetConfig
from ldm_core.networks.strict_load import load_strict
from ldm_core.networks.weight_cast import compute_dtype, weight_for


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the original LDM code: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half).

    timesteps: [N] (any real values) -> [N, dim] float32; an odd `dim` gets a zero last column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def size_embedding(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's Fourier features of the size/crop (or aesthetic score) scalars.

    values: [B, n] -> [B, n * dim], each scalar through `timestep_embedding`, flattened
    per sample. The ADM input of SDXL is cat(pooled_text, size_embedding(values)).
    """
    if values.ndim != 2:
        raise ValueError(f"size_embedding expects values of shape [B, n], got {tuple(values.shape)}")
    b = values.shape[0]
    return timestep_embedding(values.flatten(), dim).reshape(b, -1)


# 3x3 convolutions with a weight of at least this many elements, over feature maps of
# at most this many output positions (batch * height * width), run as one matrix
# product; see `Conv2d`. Measured on a 2-core AVX2 CPU, batch 2: SD1.5's 1280-wide
# layers run twice as fast at 8x8 and ~10% faster at 16x16; 640-wide layers and
# larger maps gain nothing.
LARGE_WEIGHT = 1 << 23
SMALL_MAP_POSITIONS = 512


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) with a faster CPU path for wide layers on small maps.

    oneDNN re-lays out the weight on every call; for a weight of tens of megabytes
    over a few hundred pixels that costs as much as the convolution itself. There
    the input is unfolded into 3x3 patches and multiplied with the weight, whose
    ordinary storage already is the [C_out, C_in * 3 * 3] matrix (same sums, in
    another order). Weights stored in another dtype than x's are cast when used (weight_cast.py).
    """

    casts_weights = True  # weight_cast.compute_in leaves its weights in their stored dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = weight_for(self, x)
        if (
            x.device.type == "cpu" and self.kernel_size == (3, 3) and self.padding == (1, 1)
            and self.dilation == (1, 1) and self.groups == 1 and self.weight.numel() >= LARGE_WEIGHT
        ):
            h_out, w_out = (x.shape[2] - 1) // self.stride[0] + 1, (x.shape[3] - 1) // self.stride[1] + 1
            if x.shape[0] * h_out * w_out <= SMALL_MAP_POSITIONS:
                patches = F.unfold(x, 3, padding=1, stride=self.stride)  # [B, C_in * 9, H_out * W_out]
                # per sample [C_out, K] @ [K, H_out * W_out]: lands in NCHW order, no transposes
                out = torch.bmm(weight.flatten(1).expand(x.shape[0], -1, -1), patches)
                if bias is not None:
                    out += bias[:, None]
                return out.view(x.shape[0], -1, h_out, w_out)
        return self._conv_forward(x, weight, bias)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 skip if widths differ.

    x: [B, C_in, H, W], emb: [B, time_embed_dim] -> [B, C_out, H, W].
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels), nn.SiLU(), nn.Identity(),  # slot 2: dropout
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm1, _, conv1 = self.in_layers
        norm2, _, _, conv2 = self.out_layers
        # in-place ops on fresh intermediates: fewer allocations, same arithmetic
        h = conv1(F.silu(norm1(x), inplace=True))
        h += self.emb_layers(emb)[:, :, None, None]
        h = conv2(F.silu(norm2(h), inplace=True))
        return h.add_(self.skip_connection(x))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel applied after nearest 2x upsampling, as four 2x2 kernels on the input.

    Output row 2i + a (a = 0, 1) of the upsampled map reads input rows (i-1, i) with
    taps (w0, w1 + w2) when a = 0 and rows (i, i+1) with taps (w0 + w1, w2) when
    a = 1; the same along columns. weight [O, C, 3, 3] -> [4 * O, C, 2, 2], output
    channels ordered (a, b, o).
    """
    taps = weight.new_tensor([[[1, 0], [0, 1], [0, 1]], [[1, 0], [1, 0], [0, 1]]])  # [phase, 3 taps, 2 taps]
    fold = torch.einsum("ayY,bxX->yxabYX", taps, taps).reshape(9, 16)
    o, c = weight.shape[:2]
    kernels = (weight.reshape(o * c, 9) @ fold).view(o, c, 2, 2, 2, 2)  # (o, c, a, b, Y, X)
    return kernels.permute(2, 3, 0, 1, 4, 5).reshape(4 * o, c, 2, 2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution.

    The target size is that of the skip tensor it will be concatenated with, so odd
    latent sizes (where a stride-2 conv rounded up) come back to the same shape.

    On CPU an exact doubling runs as a sub-pixel convolution: four 2x2 convolutions
    of the small map, one per output phase, interleaved. Same result (sums in another
    order), 16/36 of the multiply-adds and no upsampled copy. Only for weights below
    LARGE_WEIGHT: the combined kernels are re-derived on every call (so weight patches
    are always seen), which is cheap only for those.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if size is not None and tuple(size) != (2 * h, 2 * w):
            return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
        if x.device.type != "cpu" or self.conv.weight.numel() >= LARGE_WEIGHT:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        weight, bias = weight_for(self.conv, x)
        bias = None if bias is None else bias.repeat(4)
        phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), _phase_kernels(weight), bias)
        phases = phases.view(b, 2, 2, -1, h + 1, w + 1)  # [B, a, b, C, H+1, W+1]; phase (a, b) at offset (a, b)
        out = x.new_empty(b, phases.shape[3], h, 2, w, 2)
        for row in range(2):
            for col in range(2):
                out[:, :, :, row, :, col] = phases[:, row, col, :, row:row + h, col:col + w]
        return out.view(b, -1, 2 * h, 2 * w)


class EmbedSequential(nn.Sequential):
    """A block of the UNet: runs its layers in order, handing each the input it needs."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def _mlp(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))


class ContextMap(nn.Module):
    """Context tokens [B, T, D] → a feature map [B, out_channels, h, w] to add to the stem's output.

    Each token goes through `mlp` (Linear D→4D, SiLU, Linear 4D→C·G·G) to a coarse C×G×G map;
    the maps are pooled over the tokens, upsampled bilinearly to h×w and projected by `proj`, a
    1×1 convolution that starts at zero (the UNet is unchanged until it learns). Unlike
    cross-attention, whose place-dependence is a product of learned queries and keys, the map is
    a direct function of the words (or box tokens): "top left" can paint the top left at once.

    Pooling: the mean over the tokens, or with `gated`, per channel c the weighted mean with
    weights softmax_t(gate(x_t)_c), `gate` a Linear D→C that starts at zero (so it starts as the
    mean). Either is invariant to the tokens' order and to a context repeated to a longer length
    (batched guidance); the gate lets a few tokens that say where (box tokens after 77 text
    tokens, a position word) set a channel without being averaged away.
    """

    def __init__(self, context_dim: int, grid: int, channels: int, out_channels: int, gated: bool = False) -> None:
        super().__init__()
        self.grid, self.channels = grid, channels
        self.mlp = nn.Sequential(nn.Linear(context_dim, 4 * context_dim), nn.SiLU(),
                                 nn.Linear(4 * context_dim, channels * grid * grid))
        self.gate = nn.Linear(context_dim, channels) if gated else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.proj = nn.Conv2d(channels, out_channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def grid_map(self, context: torch.Tensor) -> torch.Tensor:
        """The coarse map [B, C, G, G] before upsampling and projection (training supervises part of it)."""
        b, t = context.shape[:2]
        per_token = self.mlp(context).view(b, t, self.channels, self.grid * self.grid)
        if self.gate is None:
            pooled = per_token.mean(dim=1)
        else:
            pooled = (self.gate(context).softmax(dim=1).unsqueeze(-1) * per_token).sum(dim=1)
        return pooled.view(b, self.channels, self.grid, self.grid)

    def forward(self, context: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.proj(F.interpolate(self.grid_map(context), size=tuple(size), mode="bilinear", align_corners=False))


class UNetModel(nn.Module):
    """The LDM/SGM UNet, built from a `UNetConfig`.

    forward(x [B, C_in, h, w], timesteps [B], context [B, T, context_dim] | None,
    y [B, adm_in_channels] or [B] class ids | None) -> [B, C_out, h, w].
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if config.adm_in_channels is not None and config.num_classes is not None:
            raise ConfigError("UNetConfig: set adm_in_channels or num_classes, not both")
        self.config = config
        c = config
        mc, ted, groups = c.model_channels, c.time_embed_dim, c.norm_groups

        self.time_embed = _mlp(mc, ted)
        if c.num_classes is not None:
            self.label_emb: nn.Module | None = nn.Embedding(c.num_classes, ted)
        elif c.adm_in_channels is not None:
            self.label_emb = nn.Sequential(_mlp(c.adm_in_channels, ted))
        else:
            self.label_emb = None

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, groups,  # type: ignore[arg-type]
            )

        self.input_blocks = nn.ModuleList([EmbedSequential(Conv2d(c.in_channels, mc, 3, padding=1))])
        self.context_map = ContextMap(c.context_dim, c.context_map_grid, c.context_map_channels, mc, c.context_map_gate) \
            if c.context_map_grid > 0 else None  # type: ignore[arg-type]
        skip_channels = [mc]
        ch = mc
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, groups)]
                ch = mult * mc
                if c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block: EmbedSequential | None = None
        if c.transformer_depth_middle >= 0:
            self.middle_block = EmbedSequential(
                ResBlock(ch, ted, ch, groups), transformer(ch, c.transformer_depth_middle), ResBlock(ch, ted, ch, groups),
            )
        elif c.transformer_depth_middle == -1:
            self.middle_block = EmbedSequential(ResBlock(ch, ted, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mult * mc, groups)]
                ch = mult * mc
                if c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), Conv2d(mc, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.time_embed[0])

    def _embedding(self, timesteps: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.dtype))
        if self.label_emb is None:
            if y is not None:
                raise ValueError("this UNet has no class/ADM conditioning; pass y=None")
            return emb
        if y is None:
            raise ValueError("this UNet needs y: the ADM vector [B, adm_in_channels] or class ids [B]")
        if isinstance(self.label_emb, nn.Embedding):
            return emb + self.label_emb(y)
        return emb + self.label_emb(y.to(self.dtype))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, C_in, h, w], timesteps: [B] -> [B, C_out, h, w] in x's dtype."""
        out_dtype = x.dtype
        emb = self._embedding(timesteps, y, x.shape[0])
        if context is not None:
            context = context.to(self.dtype)
        h = x.to(self.dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0 and self.context_map is not None and context is not None:
                h = h + self.context_map(context, h.shape[-2:])
            skips.append(h)
        if self.middle_block is not None:
            h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(out_dtype)

    @classmethod
    def from_state_dict(
        cls, config: UNetConfig, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
    ) -> UNetModel:
        """Build on the meta device and take `sd`'s tensors (keys without `model.diffusion_model.`).

        `dtype`: of the weights; None keeps the file's floating dtype when all its
        floating tensors share one (float32 otherwise). Raises StateDictMismatchError
        naming the keys when `sd` does not fit `config` exactly.
        """
        if dtype is None:
            found = {v.dtype for v in sd.values() if v.is_floating_point()}
            dtype = found.pop() if len(found) == 1 else torch.float32
        with torch.device("meta"):
            model = cls(config).to(dtype)
        load_strict(model, sd, "UNet")
        return model.eval()


__all__ = ["UNetModel", "ContextMap", "timestep_embedding", "size_embedding", "ResBlock", "Downsample", "Upsample"]
