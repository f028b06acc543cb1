"""Reading weights files and splitting single-file checkpoints into components.

`.safetensors` files are memory-mapped: each tensor is a view into one
copy-on-write mapping of the file, so reading costs no copy and pages are touched
only when a weight is used. Pickle-based files (`.ckpt`, `.pt`, `.pth`, `.bin`) are
read only through `torch.load(weights_only=True)`; a file that needs anything beyond
tensors and plain containers is refused before any of its code could run.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_core.errors import CheckpointFormatError, UnsafeCheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024

# Where each component lives inside a single-file checkpoint (original LDM / SGM layouts).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
LAYOUT_PREFIX = "layout_stage_model."  # box-layout encoder of a text+layout model (ModelConfig.layout)
TEXT_ENCODER_PREFIXES = (
    "cond_stage_model.transformer.",  # SD1.x: transformers CLIPTextModel keys
    "cond_stage_model.model.",  # SD2.x: OpenCLIP keys
    "conditioner.embedders.0.transformer.",  # SDXL base: CLIP-L
    "conditioner.embedders.0.model.",  # SDXL refiner: OpenCLIP bigG
    "conditioner.embedders.1.model.",  # SDXL base: OpenCLIP bigG
)
# Keys a checkpoint may carry that no inference component needs: training-time DDPM
# buffers, EMA bookkeeping, the autoencoder's discriminator/loss, prediction markers.
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "cond_stage_model.model.visual.")
_IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "ztsnr", "denoiser.sigmas", "model.logvar",
}
# Top-level prefixes of a standalone VAE file (no `first_stage_model.`).
VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@dataclass
class WeightsFile:
    """The tensors of one file (memory-mapped where possible) and its text metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def _safetensors_header(path: Path, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFormatError(f"{path.name}: file is {size} bytes, too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointFormatError(
                f"{path.name}: safetensors header claims {n} bytes but the file has {size}; "
                "the file is truncated or not safetensors (re-download or re-export it)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{path.name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path.name}: safetensors header is not a JSON object")
    return header, 8 + n


def _short(value: object, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: a corrupt header can hold megabytes of text."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def read_safetensors(path: str | os.PathLike) -> WeightsFile:
    """Memory-map a safetensors file; every entry is validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    header, data_start = _safetensors_header(path, size)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(f"{path.name}: __metadata__ is not an object")
    data_len = size - data_start
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else None
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path.name}: malformed header entry for {_short(name)}: {_short(info)}; "
                                        "the file is corrupt") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
            raise CheckpointFormatError(
                f"{path.name}: tensor {_short(name)} lies outside the file or has the wrong byte size "
                f"(offsets {begin}..{end} of {data_len} data bytes, needs {nbytes}); the file is truncated or corrupt"
            )
        tensors[name] = _view(storage, data_start + begin, dtype, shape)
    return WeightsFile(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _view(storage: torch.UntypedStorage | None, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor viewing `storage` at byte `offset` (a copy only if the offset is misaligned)."""
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0 or storage is None:
        return torch.empty(shape, dtype=dtype)
    if offset % dtype.itemsize == 0:
        return torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
    # Legal in the format, rare in practice: copy just this tensor.
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, [numel * dtype.itemsize])
    return raw.clone().view(dtype).reshape(shape)


def read_pickle(path: str | os.PathLike) -> WeightsFile:
    """Read a `.ckpt`/`.pt`/`.bin` with `weights_only=True`; unwraps `state_dict` containers."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path.name}: refused to load. The file holds Python objects beyond tensors, and unpickling "
            f"them could run arbitrary code ({str(e).splitlines()[0][:200]}). Nothing from it was executed. "
            "Use a .safetensors version of this model, or convert the file with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path.name}: not a readable torch checkpoint (truncated or corrupt?): {str(e).splitlines()[0][:200]}"
        ) from None
    for key in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not _all_tensors(obj):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError(f"{path.name}: the file holds no tensors")
    return WeightsFile(path, tensors, {})


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _all_tensors(d: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read any supported weights file by its suffix (or, lacking one, by its first bytes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return read_pickle(path)
    raise CheckpointFormatError(
        f"{path.name}: unknown weights format {suffix!r}; supported: "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


@dataclass
class Components:
    """A checkpoint's tensors grouped by component, prefixes stripped."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    vae: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoders: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # by prefix
    layout: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def split_components(tensors: dict[str, torch.Tensor]) -> Components:
    """Group a single file's keys by component prefix. Standalone VAE keys count as VAE."""
    out = Components()
    for key, t in tensors.items():
        if key.startswith(UNET_PREFIX):
            out.unet[key[len(UNET_PREFIX):]] = t
        elif key.startswith(VAE_PREFIX) and not key.startswith(_IGNORED_PREFIXES):
            out.vae[key[len(VAE_PREFIX):]] = t
        elif key.startswith(LAYOUT_PREFIX):
            out.layout[key[len(LAYOUT_PREFIX):]] = t
        elif key.startswith(VAE_TOP_LEVEL):
            out.vae[key] = t
        elif key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
            out.ignored.append(key)
        else:
            for prefix in TEXT_ENCODER_PREFIXES:
                if key.startswith(prefix):
                    out.text_encoders.setdefault(prefix, {})[key[len(prefix):]] = t
                    break
            else:
                out.unknown.append(key)
    return out


def prefix_summary(keys: list[str], depth: int = 2, limit: int = 12) -> str:
    """'prefix (count)' for the most common key prefixes: what an unknown file holds."""
    counts: dict[str, int] = {}
    for k in keys:
        p = ".".join(k.split(".")[:depth])
        counts[p] = counts.get(p, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{p} ({n})" for p, n in top) or "no tensors"
