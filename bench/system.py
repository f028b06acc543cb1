"""What the numbers were measured on, and making a file's next read come from disk."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> list[str]:
    import diffusers
    import transformers

    return [
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), load average {_loadavg()}",
    ]


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def evict(path: Path, *, whole_cache: bool = True) -> str:
    """Try to make the next read of `path` come from disk; says how, or "warm page cache" if it failed.

    `whole_cache`: first the whole page cache (`sync; echo 3 > drop_caches`, root only);
    otherwise, or when that is refused, just this file's clean pages
    (`posix_fadvise(DONTNEED)`, unprivileged, and it leaves a shared machine's other
    files alone). Neither can drop pages that a live mapping still holds, so the result
    is checked with `fincore` when present.
    """
    os.sync()
    how = _drop_caches() if whole_cache else None
    how = how or _fadvise_dontneed(path)
    if how is None:
        return "warm page cache"
    resident = resident_fraction(path)
    if resident is None:
        return f"{how}, unverified"
    return how if resident < 0.05 else f"warm page cache ({resident:.0%} still resident)"


def _drop_caches() -> str | None:
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return None
    return "drop_caches"


def _fadvise_dontneed(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):  # AttributeError: no posix_fadvise on this platform
        return None
    return "fadvise"


def resident_fraction(path: Path) -> float | None:
    """Share of `path` in the page cache, from util-linux `fincore` (None if it is not installed)."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        res, size = int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return res / size if size else 0.0
