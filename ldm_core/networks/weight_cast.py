"""Weights kept in their stored dtype, computed in the compute dtype.

A model loaded from an fp16 file keeps its fp16 weights (half the memory of fp32, and on the
CPU no copy of the memory-mapped file at all); each layer casts its weight to the compute
dtype when it runs and drops the cast copy after. Casting fp16 or bf16 to fp32 is exact, so
such a model computes bit for bit what the same model converted to fp32 at load computes.

`compute_in(model, dtype)` turns every Linear, Conv, GroupNorm, LayerNorm and Embedding whose
weights are stored in another dtype into its casting twin (the same module, its class
swapped: parameters, keys and hooks stay as they are); layers already stored in the compute
dtype keep their plain class and cost nothing. Code that reads a layer's weight directly
(instead of calling the layer) casts it with `weight_for(layer, x)`; a layer class of the
engine's own that does so throughout says `casts_weights = True` and is left as it is.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class CastLinear(nn.Linear):
    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _cast(self.weight, self.compute_dtype), _cast(self.bias, self.compute_dtype))


class _CastConv:
    """The convolution of nn.Conv1d / nn.Conv2d (their `_conv_forward`) with cast weights."""

    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _cast(self.weight, self.compute_dtype), _cast(self.bias, self.compute_dtype))


class CastConv1d(_CastConv, nn.Conv1d):
    pass


class CastConv2d(_CastConv, nn.Conv2d):
    pass


class CastGroupNorm(nn.GroupNorm):
    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, self.compute_dtype),
                            _cast(self.bias, self.compute_dtype), self.eps)


class CastLayerNorm(nn.LayerNorm):
    compute_dtype: torch.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, self.compute_dtype),
                            _cast(self.bias, self.compute_dtype), self.eps)


class CastEmbedding(nn.Embedding):
    compute_dtype: torch.dtype

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, _cast(self.weight, self.compute_dtype), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


# Exact classes only: a subclass (transformers' own layers, torch's quantizable Linear) may
# compute differently and is left alone.
CASTING = {nn.Linear: CastLinear, nn.Conv1d: CastConv1d, nn.Conv2d: CastConv2d, nn.GroupNorm: CastGroupNorm,
           nn.LayerNorm: CastLayerNorm, nn.Embedding: CastEmbedding}
PLAIN = {cast: plain for plain, cast in CASTING.items()}


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `model` compute in `dtype` whatever dtype its weights are stored in; returns it.

    Floating parameters or buffers outside the layers above (a raw nn.Parameter, say) are
    converted to `dtype` outright, so nothing computes in a storage dtype by accident.
    """
    for module in model.modules():
        plain = PLAIN.get(type(module), type(module))
        stored_otherwise = any(t is not None and t.is_floating_point() and t.dtype != dtype
                               for t in (*module._parameters.values(), *module._buffers.values()))
        if getattr(module, "casts_weights", False):  # casts by itself: only told what it computes in
            if stored_otherwise:
                module.compute_dtype = dtype
            else:
                module.__dict__.pop("compute_dtype", None)
            continue
        if plain in CASTING:
            if stored_otherwise:
                module.__class__ = CASTING[plain]
                module.compute_dtype = dtype
            elif plain is not type(module):
                module.__class__ = plain
                del module.compute_dtype
            continue
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    converted = t.to(dtype)
                    table[name] = nn.Parameter(converted, requires_grad=False) if isinstance(t, nn.Parameter) else converted
    return model


@contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype, restore: torch.dtype) -> Iterator[nn.Module]:
    """Run a block with `model` computing in `dtype`, then computing in `restore` again."""
    compute_in(model, dtype)
    try:
        yield model
    finally:
        compute_in(model, restore)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype `layer` computes in: its casting dtype, else its weight's."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def model_compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model`'s layers compute in (that of its first castable layer)."""
    for module in model.modules():
        if PLAIN.get(type(module), type(module)) in CASTING:
            return compute_dtype(module)
    return next(model.parameters()).dtype


def weight_for(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of `layer` in x's dtype, for code that applies a layer's weights itself."""
    return layer.weight.to(x.dtype), _cast(layer.bias, x.dtype)


def storage_dtype(tensors: Mapping[str, Tensor], compute: torch.dtype,
                  requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype to keep a part's weights in: `requested` when given, else the file's own floating
    dtype (a file mixing several is converted to the compute dtype), but never wider than the
    compute dtype (fp32 weights computed in fp16 are stored in fp16, as they are used)."""
    if requested is not None:
        return requested
    found = {t.dtype for t in tensors.values() if t.is_floating_point()}
    stored = found.pop() if len(found) == 1 else compute
    return compute if torch.finfo(stored).bits > torch.finfo(compute).bits else stored


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
