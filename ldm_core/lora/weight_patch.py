"""LoRA and its relatives: low-rank weight patches carried by a model view, merged only while it runs.

The math (Hu et al. 2021). A LoRA layer holds down D [r, C_in(, k, k)], up U [C_out, r(, 1, 1)]
and optionally α; with strength s the patched weight is

    W' = W + s · (α / r) · reshape(U·D)          (α absent: α/r = 1, as PEFT files mean it)

A 3×3 LoCon layer is the same product read as the composition of two convolutions: D is a
3×3 convolution C_in → r and U a 1×1 convolution r → C_out, so U·D flattens to one
[C_out, C_in·3·3] kernel. With a `lora_mid` M [r, r, k, k] (LoCon/CP), D is 1×1 and the
kernel is U ∘ M ∘ D. Also applied, because each is one line of math: full differences
(`.diff`, `.diff_b`: W' = W + s·ΔW), LoHa (ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b)) and LoKr
(ΔW = (α/r)·W1 ⊗ W2, either factor possibly a product of two). Anything else a file holds
(DoRA scales, Tucker cores, "set" weights) is reported as not applied, never dropped silently.
Several patches on one weight add up in float32 in the order they were loaded, and the sum
is cast once to the dtype the layer computes in (its weight's, or wider for weights kept in
a narrower storage dtype: networks/weight_cast.py).

Design: the graph runtime caches node outputs, so the model a checkpoint loader returned must
never change. `apply_lora` therefore returns *new* `DiffusionModel` / `TextEncoder` values
that share the base modules and carry a tuple of `WeightPatch`es (several LoRAs stack by
concatenating tuples). The patches are materialised only while the model runs:

- text encoding (`TextEncoder.encode`) runs inside `patched(module, patches)`, which
  computes the merged tensors, swaps them into the module's parameter slots, and puts the
  original Parameter objects back afterwards (even on error);
- sampling goes through `PatchedModule`, the UNet the `Denoiser` of a patched model calls:
  the merged tensors are computed on its first forward, kept for the life of that denoiser
  (one sampling run) and swapped in around every forward, so between calls, and after the
  run, the shared UNet holds exactly its own weights again.

Only patched tensors ever get a second copy; base tensors are never written, so they stay
bit-identical (and memory-mapped weights stay mapped). Two views must not run their forward
passes interleaved on the same module at the same moment (nested swaps are refused).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ldm_core.errors import CheckpointError
from ldm_core.lora.lora_names import TEXT_PREFIXES, UNET_PREFIXES

log = logging.getLogger(__name__)


class LoraMismatchError(CheckpointError):
    """A LoRA file does not fit the model it is applied to (another family, or no shared layer)."""


# ---------------------------------------------------------------------------
# Reading: file keys grouped into layers, each with its named parts.

# (suffix of a file key, part name); tried longest first.
_PARTS = sorted([
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B", "up"), (".lora_A", "down"), (".alpha", "alpha"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".w_norm", "diff"), (".b_norm", "diff_b"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t2", "lokr_t2"),
    (".dora_scale", "dora_scale"), (".reshape_weight", "reshape_weight"), (".set_weight", "set_weight"),
], key=lambda item: -len(item[0]))

_UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)", "hada_t1": "LoHa with Tucker cores",
    "lokr_t2": "LoKr with a Tucker core", "reshape_weight": "weight reshaping", "set_weight": "weight replacement",
}


def group_layers(tensors: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """File keys → {layer name: {part: tensor}}, plus {key: reason} for keys of no known form."""
    layers: dict[str, dict[str, Tensor]] = {}
    unknown: dict[str, str] = {}
    for key, value in tensors.items():
        for suffix, part in _PARTS:
            if key.endswith(suffix) and len(key) > len(suffix):
                layers.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            unknown[key] = "not a LoRA/LyCORIS tensor name"
    return layers, unknown


# ---------------------------------------------------------------------------
# Adapters: each turns its factors into ΔW (float32, the target's shape), α/r included.

class Adapter(Protocol):
    def check(self, shape: torch.Size) -> str | None: ...  # why it cannot patch `shape`, or None
    def delta(self, shape: torch.Size, device: torch.device) -> Tensor: ...


def _f32(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if alpha is None else alpha / rank


@dataclass(frozen=True, eq=False)
class LowRank:
    """LoRA / LoCon: ΔW = (α/r)·U·D, D = M∘D₁ when a mid kernel M is given."""

    up: Tensor
    down: Tensor
    mid: Tensor | None = None
    alpha: float | None = None

    def _down_shape(self) -> tuple[int, ...]:
        if self.mid is None:
            return tuple(self.down.shape)
        return (self.mid.shape[0], self.down.shape[1], *self.mid.shape[2:])

    def check(self, shape: torch.Size) -> str | None:
        down = self._down_shape()
        if self.mid is not None and (self.mid.shape[1] != self.down.shape[0] or self.down[0].numel() != self.down.shape[1]):
            return f"lora_mid {tuple(self.mid.shape)} does not follow a 1×1 lora_down {tuple(self.down.shape)}"
        if (self.up.shape[0] != shape[0] or self.up[0].numel() != down[0]
                or math.prod(down[1:]) != math.prod(shape[1:])):
            return f"up {tuple(self.up.shape)} · down {down} gives no {tuple(shape)} weight"
        return None

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        down = _f32(self.down, device)
        if self.mid is not None:  # D[o, c, y, x] = Σ_i M[o, i, y, x] · D₁[i, c]
            down = torch.einsum("oiyx,ic->ocyx", _f32(self.mid, device), down.flatten(1))
        product = _f32(self.up, device).flatten(1) @ down.flatten(1)
        return product.mul_(_scale(self.alpha, self.down.shape[0])).reshape(shape)


@dataclass(frozen=True, eq=False)
class Full:
    """A full difference: ΔW given as is."""

    diff: Tensor

    def check(self, shape: torch.Size) -> str | None:
        return None if self.diff.numel() == math.prod(shape) else f"diff {tuple(self.diff.shape)} is not {tuple(shape)}"

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        return _f32(self.diff, device).reshape(shape)


@dataclass(frozen=True, eq=False)
class LoHa:
    """LoHa (Hadamard product of two low-rank products): ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b)."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    alpha: float | None = None

    def check(self, shape: torch.Size) -> str | None:
        ok = all(a.shape[0] == shape[0] and b[0].numel() == math.prod(shape[1:]) and a.shape[1] == b.shape[0]
                 for a, b in ((self.w1a, self.w1b), (self.w2a, self.w2b)))
        return None if ok else f"LoHa factors {tuple(self.w1a.shape)}·{tuple(self.w1b.shape)} give no {tuple(shape)} weight"

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        m1 = _f32(self.w1a, device) @ _f32(self.w1b, device).flatten(1)
        m2 = _f32(self.w2a, device) @ _f32(self.w2b, device).flatten(1)
        return (m1 * m2).mul_(_scale(self.alpha, self.w1b.shape[0])).reshape(shape)


@dataclass(frozen=True, eq=False)
class LoKr:
    """LoKr (Kronecker product): ΔW = (α/r)·W1 ⊗ W2; each factor whole or a product a·b
    (r: the rank of the decomposed factor, W2's if both are; α/r = 1 if neither is)."""

    w1: Tensor | tuple[Tensor, Tensor]
    w2: Tensor | tuple[Tensor, Tensor]
    alpha: float | None = None

    @staticmethod
    def _factor(w: Tensor | tuple[Tensor, Tensor], device: torch.device) -> Tensor:
        if isinstance(w, tuple):
            return _f32(w[0], device) @ _f32(w[1], device).flatten(1)
        return _f32(w, device)

    def _rank(self) -> int | None:
        for w in (self.w2, self.w1):
            if isinstance(w, tuple):
                return w[1].shape[0]
        return None

    def _product(self, device: torch.device) -> Tensor:
        w1, w2 = self._factor(self.w1, device), self._factor(self.w2, device)
        if isinstance(self.w2, tuple) and self.w2[1].ndim == 4:  # conv factor: b flattened [r, C·k·k]
            w2 = w2.reshape(w2.shape[0], *self.w2[1].shape[1:])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def check(self, shape: torch.Size) -> str | None:
        size = self._product(torch.device("meta")).shape
        ok = size[0] == shape[0] and math.prod(size) == math.prod(shape)
        return None if ok else f"LoKr factors give {tuple(size)}, not {tuple(shape)}"

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        rank = self._rank()
        scale = 1.0 if rank is None or self.alpha is None else self.alpha / rank
        return self._product(device).mul_(scale).reshape(shape)


def make_adapters(parts: Mapping[str, Tensor]) -> tuple[dict[str, Adapter], str | None]:
    """A layer's parts → {"weight"/"bias": adapter}, or ({}, reason) when it cannot be applied."""
    if found := [name for part, name in _UNSUPPORTED.items() if part in parts]:
        return {}, f"uses {', '.join(found)}, which is not applied (supported: LoRA/LoCon, LoHa, LoKr, diff)"
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    out: dict[str, Adapter] = {}
    if "up" in parts or "down" in parts:
        if "up" not in parts or "down" not in parts:
            return {}, "has only one of the two LoRA factors (up/down, lora_B/lora_A)"
        out["weight"] = LowRank(parts["up"], parts["down"], parts.get("mid"), alpha)
    elif "hada_w1_a" in parts:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if missing := [n for n in names if n not in parts]:
            return {}, f"LoHa layer lacks {', '.join(missing)}"
        out["weight"] = LoHa(*(parts[n] for n in names), alpha)
    elif any(p.startswith("lokr_") for p in parts):
        factors = []
        for i in (1, 2):
            whole, a, b = parts.get(f"lokr_w{i}"), parts.get(f"lokr_w{i}_a"), parts.get(f"lokr_w{i}_b")
            if whole is None and (a is None or b is None):
                return {}, f"LoKr layer lacks lokr_w{i} (or lokr_w{i}_a and _b)"
            factors.append(whole if whole is not None else (a, b))
        out["weight"] = LoKr(factors[0], factors[1], alpha)
    elif "diff" in parts:
        out["weight"] = Full(parts["diff"])
    if "diff_b" in parts:
        out["bias"] = Full(parts["diff_b"])
    if not out:
        return {}, "holds only " + ", ".join(sorted(parts))
    return out, None


# ---------------------------------------------------------------------------
# Patches and how they are materialised.

@dataclass(frozen=True, eq=False)
class WeightPatch:
    """ΔW of `adapter`, times `strength`, added to the tensor `key` of a module's state dict."""

    key: str
    adapter: Adapter
    strength: float
    source: str = ""  # the LoRA file it came from, for messages


def merged_weight(weight: Tensor, patches: Sequence[WeightPatch], dtype: torch.dtype | None = None) -> Tensor:
    """W + Σ sᵢ·ΔWᵢ, summed in float32 in order, cast to `dtype` (default W's). W itself is not touched."""
    out = weight.to(torch.float32, copy=True)
    for p in patches:
        out.add_(p.adapter.delta(weight.shape, weight.device), alpha=p.strength)
    return out.to(dtype or weight.dtype)


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, dict[str, Any], str]:
    path, _, name = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if name in owner._parameters:
        return owner, owner._parameters, name
    if name in owner._buffers:
        return owner, owner._buffers, name
    raise KeyError(f"{key} is not a parameter or buffer of {type(module).__name__}")


def _slot(module: nn.Module, key: str) -> tuple[dict[str, Any], str]:
    return _owner(module, key)[1:]


def merged_weights(module: nn.Module, patches: Sequence[WeightPatch]) -> dict[str, Tensor]:
    """{key: merged tensor} for every key some patch touches."""
    by_key: dict[str, list[WeightPatch]] = {}
    for p in patches:
        by_key.setdefault(p.key, []).append(p)
    out = {}
    for key, group in by_key.items():
        owner, table, name = _owner(module, key)
        # A layer computing in a wider dtype than its weights are stored in (weight_cast.py) gets
        # its merged weight in that dtype: what the same model converted at load would hold.
        out[key] = merged_weight(table[name], group, getattr(owner, "compute_dtype", None))
    return out


_ACTIVE = "_ldm_patched_weights"  # set on a module while swapped tensors are in place


@contextmanager
def swapped(module: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Put `weights` into `module`'s parameter slots for the block; the original objects come back after."""
    if not weights:
        yield module
        return
    if module.__dict__.get(_ACTIVE):
        raise RuntimeError("this model's weights are already patched by another LoRA view that is running; "
                           "run patched views one after the other")
    saved = []
    module.__dict__[_ACTIVE] = True
    try:
        for key, value in weights.items():
            table, name = _slot(module, key)
            saved.append((table, name, table[name]))
            table[name] = nn.Parameter(value, requires_grad=False) if isinstance(table[name], nn.Parameter) else value
        yield module
    finally:
        for table, name, original in reversed(saved):
            table[name] = original
        del module.__dict__[_ACTIVE]


@contextmanager
def patched(module: nn.Module, patches: Sequence[WeightPatch]) -> Iterator[nn.Module]:
    """Run a block with `patches` merged into `module` (nothing happens without patches)."""
    with torch.inference_mode(), swapped(module, merged_weights(module, patches) if patches else {}):
        yield module


class PatchedModule:
    """Calls `module` with its patched weights swapped in around each call.

    The merged tensors are computed at the first call (on the weights' device then) and
    kept by this object, so one sampling run merges once; they are freed with it.
    Attribute reads go to the base module.
    """

    def __init__(self, module: nn.Module, patches: Sequence[WeightPatch]) -> None:
        self.module, self.patches = module, tuple(patches)
        self._weights: dict[str, Tensor] | None = None
        self._placed: tuple | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next(self.module.parameters())
        placed = (first.device, first.dtype)
        if self._weights is None or self._placed != placed:
            with torch.inference_mode():
                self._weights, self._placed = merged_weights(self.module, self.patches), placed
        with swapped(self.module, self._weights):
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


# ---------------------------------------------------------------------------
# Matching a LoRA file to a model.

@dataclass(frozen=True)
class LoraReport:
    """What applying one LoRA file did: layers patched per part, and file keys not applied (with why)."""

    name: str
    unet_layers: int = 0
    text_layers: int = 0
    unmatched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # keys for a part that was not given (no CLIP, ...)

    def summary(self) -> str:
        parts = [f"{self.name}: {self.unet_layers} UNet and {self.text_layers} text-encoder layers patched"]
        if self.unmatched:
            keys = sorted(self.unmatched)
            more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
            reasons = sorted(set(self.unmatched.values()))
            parts.append(f"{len(keys)} keys NOT applied ({'; '.join(reasons)}): {', '.join(keys[:8])}{more}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} keys skipped ({'; '.join(sorted(set(self.skipped.values())))})")
        return "; ".join(parts)


@dataclass(frozen=True)
class LoraTarget:
    """One model part a LoRA can patch: its name → key map and its tensor shapes."""

    part: str  # "unet" or "text"
    key_map: Mapping[str, str]
    shapes: Mapping[str, torch.Size]


FAMILY_BY_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


def context_width(layers: Mapping[str, Mapping[str, Tensor]]) -> int | None:
    """The cross-attention context width a LoRA was trained for, read off an attn2 to_k factor."""
    for name, parts in layers.items():
        flat = name.replace(".", "_")
        if "attn2_to_k" in flat or "attn2_processor_to_k" in flat:
            if "down" in parts:
                return int(parts["down"].shape[1])
            if "diff" in parts:
                return int(parts["diff"].shape[1])
    return None


def _family_hint(layers: Mapping[str, Mapping[str, Tensor]], model_context: int | None) -> str:
    width = context_width(layers)
    if width is None:
        return ""
    family = FAMILY_BY_CONTEXT.get(width)
    hint = (f" It looks made for {family} (cross-attention context width {width})" if family
            else f" It was made for a model of cross-attention context width {width}")
    if model_context is not None:
        hint += f"; this model's is {model_context}"
    return hint + "."


def match_layers(layers: Mapping[str, Mapping[str, Tensor]], targets: Sequence[LoraTarget], *, name: str,
                 skip_prefixes: Sequence[str] = (), model_context: int | None = None,
                 model_family: str = "model") -> tuple[dict[str, list[tuple[str, Adapter]]], LoraReport]:
    """Layers → {part: [(key, adapter)]} and a report; raises LoraMismatchError for a LoRA of another family.

    A layer whose name starts with one of `skip_prefixes` (the part that was not given, e.g.
    the text encoder for a model-only loader) is skipped, not unmatched.
    """
    found: dict[str, list[tuple[str, Adapter]]] = {t.part: [] for t in targets}
    unmatched: dict[str, str] = {}
    skipped: dict[str, str] = {}
    wrong_shape: list[str] = []
    counts = {t.part: 0 for t in targets}
    for layer, parts in layers.items():
        file_keys = [f"{layer}[{p}]" for p in sorted(parts)]
        target = next((t for t in targets if layer in t.key_map), None)
        if target is None:
            if layer.startswith(tuple(skip_prefixes)):
                skipped.update(dict.fromkeys(file_keys, "for a model part this loader was not given"))
            else:
                unmatched.update(dict.fromkeys(file_keys, "no weight of this model has this name"))
            continue
        adapters, reason = make_adapters(parts)
        if reason is not None:
            unmatched.update(dict.fromkeys(file_keys, reason))
            continue
        weight_key = target.key_map[layer]
        before = len(found[target.part])
        for slot, adapter in adapters.items():
            key = weight_key if slot == "weight" or not weight_key.endswith(".weight") else weight_key[:-6] + "bias"
            if key not in target.shapes:
                unmatched.update(dict.fromkeys(file_keys, f"the model has no {key}"))
                continue
            problem = adapter.check(target.shapes[key])
            if problem is not None:
                wrong_shape.append(f"{layer} → {key}: {problem}")
                continue
            found[target.part].append((key, adapter))
        counts[target.part] += len(found[target.part]) > before
    if wrong_shape:
        raise LoraMismatchError(
            f"LoRA {name!r} does not fit this {model_family} model: {len(wrong_shape)} of its layers have other "
            f"shapes than the model's weights (first: {wrong_shape[0]}).{_family_hint(layers, model_context)} "
            "Use a LoRA trained for this model family."
        )
    if layers and not any(found.values()) and not skipped:
        first = ", ".join(sorted(layers)[:3])
        raise LoraMismatchError(
            f"LoRA {name!r} patches nothing in this {model_family} model: none of its {len(layers)} layer names "
            f"(e.g. {first}) is a layer of the model.{_family_hint(layers, model_context)} "
            "Use a LoRA trained for this model family, in kohya, LyCORIS or diffusers/PEFT naming."
        )
    report = LoraReport(name, counts.get("unet", 0), counts.get("text", 0), unmatched, skipped)
    return found, report


@dataclass(frozen=True)
class LoraResult:
    """`apply_lora`'s answer: the patched views (None where none was given) and the report."""

    model: Any
    clip: Any
    report: LoraReport


def read_lora(path: str | os.PathLike) -> dict[str, Tensor]:
    """A LoRA file's tensors (safetensors, or a weights-only torch pickle; see checkpoint.read_weights)."""
    from ldm_core.checkpoints.weights_file import read_weights

    return read_weights(path).tensors


def apply_lora(model: Any, clip: Any, lora: str | os.PathLike | Mapping[str, Tensor],
               strength_model: float = 1.0, strength_clip: float = 1.0, *, name: str | None = None) -> LoraResult:
    """Patch a DiffusionModel and/or TextEncoder with one LoRA file; the inputs are left unchanged.

    Returns new views carrying the patches (or the inputs themselves at strength 0) and a
    `LoraReport`; file keys that were not applied are logged as a warning and listed there.
    Raises LoraMismatchError for a LoRA made for another model family.
    """
    if isinstance(lora, (str, os.PathLike)):
        name = name or Path(lora).name
        tensors = read_lora(lora)
    else:
        name, tensors = name or "LoRA", lora
    layers, unknown = group_layers(tensors)
    if not layers:
        raise LoraMismatchError(
            f"{name}: holds no LoRA/LyCORIS tensors (keys like ...lora_down.weight, ...lora_A.weight, "
            f"...hada_w1_a); it is some other kind of weights file: {', '.join(sorted(tensors)[:5])}"
        )
    targets, skip = [], []
    if model is not None:
        targets.append(model.lora_target())
    else:
        skip.extend(UNET_PREFIXES)
    if clip is not None:
        targets.append(clip.lora_target())
    else:
        skip.extend(TEXT_PREFIXES)
    if not targets:
        raise ValueError("apply_lora needs a model or a text encoder to patch")
    context = model.config.unet.context_dim if model is not None else None
    family = model.config.family if model is not None else "text encoder"
    found, report = match_layers(layers, targets, name=name, skip_prefixes=skip, model_context=context,
                                 model_family=family)
    if unknown:
        report = LoraReport(report.name, report.unet_layers, report.text_layers, {**report.unmatched, **unknown},
                            report.skipped)
    if report.unmatched:
        log.warning("LoRA %s", report.summary())

    def view(target: Any, part: str, strength: float) -> Any:
        if target is None or strength == 0 or not found.get(part):
            return target
        return target.with_patches([WeightPatch(k, a, float(strength), name) for k, a in found[part]])

    return LoraResult(view(model, "unet", strength_model), view(clip, "text", strength_clip), report)


__all__ = [
    "LoraMismatchError", "LowRank", "Full", "LoHa", "LoKr", "WeightPatch", "LoraReport", "LoraResult",
    "LoraTarget", "group_layers", "make_adapters", "merged_weight", "merged_weights", "swapped", "patched",
    "PatchedModule", "match_layers", "read_lora", "apply_lora", "context_width",
]
