"""Attention layers of the LDM UNet: cross-attention, GEGLU feed-forward, transformer blocks.

Attribute paths mirror the original checkpoints (`attn1.to_q`, `ff.net.0.proj`,
`proj_in`, `transformer_blocks.0.norm1`, ...), so a `SpatialTransformer` loads the
keys under `input_blocks.N.1.` strictly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.networks.weight_cast import weight_for


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None).

    x: [B, N, query_dim], context: [B, T, context_dim] -> [B, N, query_dim].
    Scale 1/sqrt(dim_head), as in the original LDM code.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        kv_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # to_out.1 was dropout

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, heads * d] -> [B, heads, L, d], a view."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        # [B, heads, N, d] -> [B, N, heads * d]; the CPU and CUDA kernels already store
        # the result token-major, so this is usually a view.
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2 * dim_out, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)


# Largest GEGLU intermediate ([rows, 2 * inner]) computed at once. Bigger ones are cut
# into row blocks: each row is independent, so the result is identical, but blocks
# this size are recycled by the allocator instead of being mapped (and page-faulted)
# afresh on every call; measured ~15% faster for SD's 64x64 level on CPU.
FEED_FORWARD_BLOCK_BYTES = 16 << 20


class FeedForward(nn.Module):
    """GEGLU MLP of inner width mult * dim; `net.1` is the (inference no-op) dropout slot.

    x: [..., dim] -> [..., dim].
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, self.inner), nn.Identity(), nn.Linear(self.inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        block = max(1, FEED_FORWARD_BLOCK_BYTES // (2 * self.inner * x.element_size()))
        if rows <= block:
            return self.net(x)
        flat = x.reshape(rows, x.shape[-1])
        out = torch.empty_like(flat)
        for start in range(0, rows, block):
            out[start:start + block] = self.net(flat[start:start + block])
        return out.view(x.shape)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention over the context, GEGLU MLP; each residual.

    x: [B, N, dim], context: [B, T, context_dim] -> [B, N, dim].
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Each branch output is a fresh tensor: adding the residual into it in place
        # saves an allocation (and its page faults on CPU) per residual.
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


def _channel_map(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a linear layer or a 1x1 convolution to tokens [B, L, C_in] -> [B, L, C_out].

    A 1x1 convolution is the same linear map over channels, so both kinds of
    checkpoint run the same code on the token layout.
    """
    weight, bias = weight_for(layer, tokens)
    return F.linear(tokens, weight if weight.ndim == 2 else weight.flatten(1), bias)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context`.

    x: [B, C, H, W], context: [B, T, context_dim] -> [B, C, H, W] (residual).
    `proj_in` / `proj_out` are 1x1 convolutions (SD1) or linear layers (SD2, SDXL:
    `use_linear`); both are the same map over channels, only the checkpoint shapes
    differ.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
        use_linear: bool = False, norm_groups: int = 32,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out: nn.Module = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, H*W, C]
        tokens = _channel_map(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = _channel_map(self.proj_out, tokens)
        # x first: the sum takes x's memory format, the tokens are read through a view
        return x + tokens.transpose(1, 2).view(b, c, h, w)
