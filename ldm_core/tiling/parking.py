"""Whole feature maps kept in a temporary file instead of process memory ("disk" parking).

Exact tiled VAE stages read windows of a whole map and write tiles of the next one. On
a CPU-only machine the device *is* host memory, so parked maps would count against the
same RAM the tiles need; a `DiskMap` keeps them in an unlinked temporary file instead.
The kernel's page cache serves it at memory speed while RAM is free and writes it out
under pressure, so a process's resident memory stays at weights + one tile's working
set whatever the image size, and images whose maps exceed RAM still complete.

Layout: channels last, [H, W, C] float32 rows, so a window [y0:y1, x0:x1] is one
contiguous run of bytes per row (one pread / pwrite per row). One sample per map.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from torch import Tensor


class DiskMap:
    """A [1, C, H, W] float32 map in a temporary file; index it like a tensor with
    `m[:, :, y0:y1, x0:x1]` (returns a CPU tensor, channels-last strides) and assign tiles
    the same way. Values round-trip bit for bit."""

    def __init__(self, channels: int, height: int, width: int, directory: str | None = None) -> None:
        self.shape = torch.Size((1, channels, height, width))
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        fd, path = tempfile.mkstemp(prefix="ldm-park-", suffix=".f32", dir=directory)
        os.unlink(path)  # gone when closed, whatever happens to the process
        self._fd = fd
        self._row = width * channels * 4
        os.ftruncate(fd, height * self._row)

    @classmethod
    def of(cls, x: Tensor, directory: str | None = None) -> DiskMap:
        m = cls(x.shape[1], x.shape[2], x.shape[3], directory)
        m[:, :, 0:x.shape[2], 0:x.shape[3]] = x
        return m

    def _box(self, key: tuple) -> tuple[int, int, int, int]:
        whole = slice(None)
        if len(key) != 4 or not all(isinstance(k, slice) for k in key) or key[0] != whole or key[1] != whole:
            raise IndexError("a DiskMap is indexed as m[:, :, y0:y1, x0:x1]")
        (y0, y1, _), (x0, x1, _) = key[2].indices(self.shape[2]), key[3].indices(self.shape[3])
        return y0, y1, x0, x1

    def __getitem__(self, key: tuple) -> Tensor:
        y0, y1, x0, x1 = self._box(key)
        c = self.shape[1]
        buf = np.empty((y1 - y0, x1 - x0, c), dtype=np.float32)
        start, length = x0 * c * 4, (x1 - x0) * c * 4
        for i, y in enumerate(range(y0, y1)):
            view = memoryview(buf[i]).cast("B")
            if os.preadv(self._fd, [view], y * self._row + start) != length:
                raise OSError("short read from the parking file")
        return torch.from_numpy(buf).unsqueeze(0).permute(0, 3, 1, 2)  # [1, C, h, w], channels-last strides

    def __setitem__(self, key: tuple, value: Tensor) -> None:
        y0, y1, x0, x1 = self._box(key)
        if tuple(value.shape) != (1, self.shape[1], y1 - y0, x1 - x0):
            raise ValueError(f"tile of shape {list(value.shape)} does not fit the box {y0}:{y1}, {x0}:{x1}")
        rows = value[0].detach().to("cpu", torch.float32).permute(1, 2, 0).contiguous().numpy()
        start = x0 * self.shape[1] * 4
        for i, y in enumerate(range(y0, y1)):
            os.pwrite(self._fd, memoryview(rows[i]).cast("B"), y * self._row + start)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """The whole map as an ordinary tensor (contiguous NCHW unless another format is asked for)."""
        return self[:, :, :, :].to(device=device, dtype=dtype or self.dtype, memory_format=memory_format)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


__all__ = ["DiskMap"]
