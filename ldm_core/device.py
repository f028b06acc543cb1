"""Device and precision choice, passed around explicitly (no global state).

Defaults: the first of cuda → mps → cpu. On CPU everything runs in fp32. On a GPU
the UNet and text encoders run in fp16 (bf16 where the card supports it and fp16 was
not asked for), the VAE in bf16 where supported, else fp32: the SD VAE overflows in
fp16 (its decoder activations exceed 65504), which gives NaN — black images — so an
fp16 VAE is only used when asked for, and a non-finite result is redone in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ldm_core.errors import DeviceError, MemoryBudgetError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on: `requested` if available (error otherwise), else cuda → mps → cpu."""
    if requested is None or str(requested) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but this torch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not _mps_available():
        raise DeviceError("device 'mps' was asked for but is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {str(requested)!r}; use cpu, cuda or mps")
    return device


def available_ram() -> int | None:
    """Bytes of RAM that can still be allocated: the kernel's MemAvailable, else the free pages
    (None where neither is known)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            pass
    return None


def require_ram(need: int, free: int | None, what: str, remedy: str, *, share: float = 1.0) -> None:
    """Refuse, before allocating, `need` bytes for `what` when they exceed `share` of the `free`
    RAM (None: unknown, allowed): a MemoryBudgetError with both sizes and the `remedy`."""
    if free is not None and need > free * share:
        raise MemoryBudgetError(f"{what} needs {need / 2**30:.3g} GiB and {free / 2**30:.3g} GiB of RAM are "
                                f"available; {remedy}")


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (CUDA: free memory; else RAM, 4 GiB if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = available_ram()
    return 4 << 30 if free is None else free


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "mps"


@dataclass(frozen=True)
class Precision:
    """Weights/compute dtype per component."""

    unet: torch.dtype = torch.float32
    text: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32


WEIGHT_DTYPES = ("auto", *DTYPES)  # how weights are stored; "auto": as in the file (never wider than computed)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """"fp32" / "fp16" / "bf16" → the torch dtype; None and "auto" → None (the default)."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    if name not in DTYPES:
        raise DeviceError(f"unknown precision {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def pick_precision(device: torch.device, *, unet: str | torch.dtype | None = None,
                   text: str | torch.dtype | None = None, vae: str | torch.dtype | None = None) -> Precision:
    """Per-component dtypes for `device`; explicit choices win."""
    if device.type == "cpu":
        default = Precision()
    else:
        half = torch.float16
        default = Precision(unet=half, text=half, vae=torch.bfloat16 if _bf16_ok(device) else torch.float32)
    return Precision(
        unet=parse_dtype(unet) or default.unet,
        text=parse_dtype(text) or default.text,
        vae=parse_dtype(vae) or default.vae,
    )
