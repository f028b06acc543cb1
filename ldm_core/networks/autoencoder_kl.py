"""AutoencoderKL, the first stage of latent diffusion: image <-> diagonal-Gaussian latent.

Attribute paths mirror the original checkpoint keys (`encoder.down.1.block.0.norm1.weight`,
`decoder.up.3.upsample.conv.bias`, `encoder.mid.attn_1.q.weight`, ...), which are the keys
after `first_stage_model.` in a single-file SD checkpoint and the bare keys of a
standalone VAE file, so loading is strict with no renaming.

Latents are raw: the family's scale factor (0.18215 SD1/2, 0.13025 SDXL) is applied by
the caller, never here. Run under `torch.inference_mode()` at the call site; the forward
passes drop each activation as soon as the next one exists, so peak memory stays near
three activations of the widest level.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_core.errors import DeviceError
from ldm_core.networks.config import VAEConfig
from ldm_core.networks.strict_load import load_strict
from ldm_core.networks.weight_cast import weight_for

_ATTN_WEIGHTS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a residual (1x1 `nin_shortcut` when widths differ)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = _conv3(c_in, c_out)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = _conv3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        # One statement per step so each intermediate is freed before the next conv runs.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in the files."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # A 1x1 conv is a linear map on tokens; [B, 1, HW, C] is one head of width C.
        q, k, v = (_token_map(m, tokens)[:, None] for m in (self.q, self.k, self.v))
        del tokens
        h = F.scaled_dot_product_attention(q, k, v)  # scale C**-0.5, as the original
        del q, k, v
        h = _token_map(self.proj_out, h[:, 0])
        return h.transpose(1, 2).reshape(b, c, height, width).add_(x)


def _token_map(conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    """A 1x1 convolution applied to tokens [B, L, C] as the linear map it is."""
    weight, bias = weight_for(conv, tokens)
    return F.linear(tokens, weight.flatten(1), bias)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (the original's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        x = self.attn_1(x)
        return self.block_2(x)


def _level(blocks: list[ResnetBlock], name: str, resample: nn.Module | None) -> nn.Module:
    """One resolution: `block.{j}` res blocks, then `downsample` / `upsample` (None at the innermost/outermost)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    setattr(level, name, resample)
    return level


class Encoder(nn.Module):
    """[B, in, H, W] -> [B, 2 z, H // f, W // f] (each level halves with floor), before quant_conv."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups, last = config.ch, config.norm_groups, len(config.ch_mult) - 1
        self.conv_in = _conv3(config.in_channels, ch)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(config.ch_mult):
            c_out = ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(config.num_res_blocks)]
            self.down.append(_level(blocks, "downsample", Downsample(c_out) if i != last else None))
            c_in = c_out
        self.mid = MidBlock(c_in, groups)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = _conv3(c_in, 2 * config.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        h = F.silu(self.norm_out(h), inplace=True)
        return self.conv_out(h)


class Decoder(nn.Module):
    """[B, z, h, w] -> [B, out, f h, f w]. `up[i]` is the level of width ch * ch_mult[i]; run from last to 0."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups = config.ch, config.norm_groups
        c_in = ch * config.ch_mult[-1]
        self.conv_in = _conv3(config.z_channels, c_in)
        self.mid = MidBlock(c_in, groups)
        levels: list[nn.Module] = []
        for i in reversed(range(len(config.ch_mult))):
            c_out = ch * config.ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(config.num_res_blocks + 1)]
            levels.insert(0, _level(blocks, "upsample", Upsample(c_out) if i != 0 else None))
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = _conv3(c_in, config.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        h = F.silu(self.norm_out(h), inplace=True)
        return self.conv_out(h)


class DiagonalGaussian:
    """The encoder's posterior N(mean, diag(std^2)); logvar is clamped to [-30, 20] as the original."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise, the noise drawn in fp32 on the CPU so a seed gives one sample on any device."""
        if generator is not None and generator.device.type != "cpu":
            raise DeviceError(
                f"DiagonalGaussian.sample draws its noise on the CPU, but got a {generator.device} generator; "
                "pass a torch.Generator() (CPU) seeded as you like."
            )
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)


def attention_weights_as_conv(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reshape linear-shaped [C, C] (or conv1d [C, C, 1]) mid-attention weights to the 1x1 conv [C, C, 1, 1].

    Some converted VAE files store q/k/v/proj_out as linear layers; the values are the same.
    Other tensors pass through untouched (views, no copies).
    """
    out = dict(sd)
    for key, w in sd.items():
        if ".mid.attn_1." in key and key.endswith(_ATTN_WEIGHTS) and w.ndim in (2, 3):
            out[key] = w.reshape(w.shape[0], w.shape[1], 1, 1)
    return out


def _file_dtype(sd: Mapping[str, Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of Stable Diffusion (and any ch_mult, i.e. any factor f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x [B, in, H, W] in [-1, 1] -> posterior over raw latents [B, embed_dim, H // f, W // f]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latent z [B, embed_dim, h, w] -> image [B, out, f h, f w], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def from_state_dict(
        cls, config: VAEConfig, sd: Mapping[str, Tensor], dtype: torch.dtype | None = None
    ) -> AutoencoderKL:
        """Build on the meta device and take `sd`'s tensors strictly (keys without `first_stage_model.`).

        `dtype` None keeps the file's floating dtype when it has a single one (no copy), else fp32.
        Raises StateDictMismatchError naming missing, unexpected or wrongly shaped keys.
        """
        sd = attention_weights_as_conv(sd)
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype or _file_dtype(sd))
        load_strict(model, sd, "VAE")
        return model.eval()


__all__ = ["AutoencoderKL", "DiagonalGaussian", "attention_weights_as_conv"]
