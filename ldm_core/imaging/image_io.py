"""IMAGE tensors ↔ PNG files: written atomically, never overwriting, never outside their folder."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_core.device import available_ram, require_ram


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE [H, W, 3] (or [1, H, W, 3]) float in 0..1 → 8-bit RGB, rounding like ComfyUI (×255, clip)."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    arr = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def from_pil(img: Image.Image) -> torch.Tensor:
    """RGB(A) picture → IMAGE [1, H, W, 3] float32 in 0..1."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_png_atomic(img: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Write `img` to `path` via a temporary file in the same folder and an exclusive link,
    so an interruption leaves no half-written PNG and an existing file is never replaced."""
    path = Path(path)
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved picture gets the usual mode
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", pnginfo=info, compress_level=4)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails with FileExistsError instead of overwriting
    finally:
        os.unlink(tmp)
    return path


def next_free_path(folder: str | os.PathLike, stem: str, counter_start: int = 1) -> Path:
    """`<stem>_00001_.png`-style name not yet taken in `folder` (ComfyUI's numbering)."""
    folder = Path(folder)
    n = counter_start
    while (p := folder / f"{stem}_{n:05d}_.png").exists():
        n += 1
    return p


class OutputPathError(ValueError):
    """A filename prefix that would write outside the output folder."""


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    """ComfyUI's %width%/%height%/%year%... placeholders in a filename prefix."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02d}",
              "day": f"{now.tm_mday:02d}", "hour": f"{now.tm_hour:02d}", "minute": f"{now.tm_min:02d}",
              "second": f"{now.tm_sec:02d}"}
    for k, v in values.items():
        prefix = prefix.replace(f"%{k}%", str(v))
    return prefix


def resolve_prefix(output_dir: str | os.PathLike, prefix: str, width: int = 0,
                   height: int = 0) -> tuple[Path, str, str]:
    """(folder, file stem, subfolder) that `prefix` names under `output_dir`, touching nothing;
    OutputPathError for a prefix that leaves the folder (`../x`, an absolute path)."""
    prefix = _expand_prefix(prefix, width, height)
    norm = os.path.normpath(prefix)
    subfolder, stem = os.path.split(norm)
    root = Path(output_dir).resolve()
    folder = (root / subfolder).resolve()
    if os.path.isabs(prefix) or not folder.is_relative_to(root) or stem in ("", ".", ".."):
        raise OutputPathError(
            f"filename_prefix {prefix!r} would write outside the output folder {root}; use a relative name such as 'images/run'"
        )
    return folder, stem, subfolder


def save_path(output_dir: str | os.PathLike, prefix: str, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """(folder, file stem, first free counter, subfolder) for `prefix`, as ComfyUI names saves:
    `<subfolder>/<stem>_<counter:05>_.png`, counter one past the highest already there.
    A prefix that leaves `output_dir` (`../x`, an absolute path) is refused."""
    folder, stem, subfolder = resolve_prefix(output_dir, prefix, width, height)
    folder.mkdir(parents=True, exist_ok=True)
    highest = 0
    for name in os.listdir(folder):
        if name[: len(stem)].lower() == stem.lower() and name[len(stem): len(stem) + 1] == "_":
            digits = name[len(stem) + 1:].split("_")[0]
            if digits.isdigit():
                highest = max(highest, int(digits))
    return folder, stem, highest + 1, subfolder


STALE_AFTER_S = 600  # a temporary file this old was left by a killed run (a save takes seconds)


def remove_stale_temp_files(folder: Path, now: float | None = None) -> list[Path]:
    """Delete `.tmp-*.png` files older than STALE_AFTER_S in `folder` (left by a killed run;
    younger ones may be another run's save in progress); returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    for tmp in folder.glob(".tmp-*.png"):
        try:
            if now - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to delete: leave it
            continue
    return removed


def save_images(images: torch.Tensor, output_dir: str | os.PathLike, prefix: str,
                text: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Save IMAGE [B,H,W,3] as PNGs named like ComfyUI's SaveImage, each written atomically and
    never over an existing file; `text` chunks (e.g. prompt/workflow JSON) go into every file."""
    folder, stem, counter, subfolder = save_path(output_dir, prefix, images.shape[2], images.shape[1])
    remove_stale_temp_files(folder)
    results = []
    for b in range(images.shape[0]):
        name = stem.replace("%batch_num%", str(b))
        while True:
            path = folder / f"{name}_{counter:05d}_.png"
            counter += 1
            try:
                write_png_atomic(to_pil(images[b]), path, text)
                break
            except FileExistsError:  # another writer took this name meanwhile: take the next
                continue
        results.append({"filename": path.name, "subfolder": subfolder, "type": "output"})
    return results


BYTES_PER_PIXEL = 16  # float32 RGB + float32 mask, what each decoded pixel becomes


def _check_decoded_size(img: Image.Image, name: str, available: int | None = None) -> None:
    """Refuse, before decoding a frame, a picture whose frames would not fit in the RAM there is
    (a 75 KB animated PNG can declare 8000² × 200 frames)."""
    frames = int(getattr(img, "n_frames", 1) or 1)
    require_ram(frames * img.size[0] * img.size[1] * BYTES_PER_PIXEL, available_ram() if available is None else available,
                f"{name}: {frames} frame(s) of {img.size[0]}×{img.size[1]} decoded",
                "use a smaller picture or fewer frames", share=0.5)


def load_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A picture file → (IMAGE [N,H,W,3], MASK [N,H,W]) as ComfyUI's LoadImage: EXIF rotation
    applied, frames of the first frame's size stacked, mask = 1 − alpha (zeros 64×64 without alpha)."""
    from PIL import ImageOps, ImageSequence

    img = Image.open(path)
    _check_decoded_size(img, Path(path).name)
    images, masks = [], []
    size = None
    for frame in ImageSequence.Iterator(img):
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        size = size or rgb.size
        if rgb.size != size:
            continue
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None])
        if "A" in frame.getbands():
            alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
            masks.append(1.0 - torch.from_numpy(alpha)[None])
        elif frame.mode == "P" and "transparency" in frame.info:
            alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
            masks.append(1.0 - torch.from_numpy(alpha)[None])
        else:
            masks.append(torch.zeros(1, 64, 64))
    if len(images) > 1 and img.format != "MPO":
        return torch.cat(images), torch.cat(masks)
    return images[0], masks[0]
