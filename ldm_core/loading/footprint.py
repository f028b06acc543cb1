"""How many bytes a node's outputs hold: tensors, modules and the loaded parts that wrap them.

The graph runtime bounds what it keeps between nodes and runs by these sizes (it knows no
tensors, so the caller hands it `nbytes`). A tensor is counted once per call however many
values share its storage (a LoRA view and its base model share the UNet's weights); weights
still mapped from their file count like any other (they are what a run would page in).
"""
from __future__ import annotations

import dataclasses
import os
import resource
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def nbytes(value: Any) -> int:
    """Bytes of the tensors reachable from `value` (tensors, modules, dataclasses, containers)."""
    seen_storages: set[int] = set()
    seen_objects: set[int] = set()
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.device.type == "meta":
                continue
            storage = item.untyped_storage()
            key = storage.data_ptr()
            if key not in seen_storages:
                seen_storages.add(key)
                total += storage.nbytes()
            continue
        if item is None or isinstance(item, (str, bytes, int, float, bool)) or id(item) in seen_objects:
            continue
        seen_objects.add(id(item))
        if isinstance(item, nn.Module):
            stack.extend(item.parameters())
            stack.extend(item.buffers())
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    return total


def parse_bytes(text: str) -> int:
    """"8G", "512M", "1.5GiB", "2000000" → bytes (K, M, G, T are powers of 1024)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(s[-1:], 1)
    number = s[:-1] if s[-1:] in "KMGT" and s[-1:] else s
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a size: {text!r}; write e.g. 8G, 512M or a number of bytes") from None
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(value)


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024
