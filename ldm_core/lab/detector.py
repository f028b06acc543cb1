"""Measured quality: find the objects in an image procedurally and score them against a prompt.

The detector knows what `scenes.py` draws (flat, saturated objects on a background of
low saturation) and nothing else, so it needs no learned weights:

1. Colour segmentation. A pixel p = background·(1 − c) + colour·c over a near-grey
   background has chroma max(p) − min(p) ≈ c · chroma(colour), so a pixel is a
   candidate when its chroma is at least 0.3 of that of the palette colour nearest to
   its hue; its colour is that palette colour.
2. Connected components (8-neighbourhood) per colour; specks below `min_area` pixels
   are dropped (noise, fringes).
3. A local colour model per component refines its mask: background b = median of the
   unclaimed pixels around it, object colour o = median of its most saturated
   pixels, coverage c = <p − b, o − b> / |o − b|² (exact for a linear mix), mask c ≥ ½.
4. Shape by template matching: the mask, cropped to its box, is compared with each
   shape stretched to fill that box (circle, full square, upward triangle); the
   template of highest IoU wins. Straight edges keep their place under blur, so this
   is steadier than area ratios.

Scores: `parse_caption` reads the grammar of `scenes.py` back into objects, position
words and relations; `score_image` says whether the detected objects are exactly the
prompt's (colour and shape of every object, nothing extra) and how many position words
and relations hold; `layout_ious` gives the box IoU of each object of a layout;
`psnr` measures reconstructions.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ldm_core.lab.scenes import COLOUR_NAMES, COLOURS, POSITION_PHRASES, RELATIONS, SHAPES, grid_cell, relation_holds

# Candidate pixels: at least this fraction of the palette chroma (a generous first cut).
CANDIDATE_CHROMA = 0.3
# A component is an object only if its own colour reaches this fraction of the palette chroma.
OBJECT_CHROMA = 0.6
TEMPLATE_SUPERSAMPLE = 4


class CaptionError(ValueError):
    """A caption is not in the grammar of `scenes.py`."""


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values [..., 3] (0 where chroma is 0)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    c = np.where(mx - mn > 0, mx - mn, 1.0)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (60.0 * h) % 360.0


_PALETTE = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float64)
_PALETTE_HUE = _hue(_PALETTE)
_PALETTE_CHROMA = _PALETTE.max(axis=-1) - _PALETTE.min(axis=-1)


@dataclass(frozen=True)
class Detection:
    """One object found in an image. `bbox` (x0, y0, x1, y1) in pixels, half-open."""

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]
    area: int
    fill: float

    @property
    def label(self) -> tuple[str, str]:
        return self.colour, self.shape


def as_image(image) -> np.ndarray:
    """An IMAGE tensor/array [H, W, 3] or [1, H, W, 3] in 0..1 → numpy float64 [H, W, 3]."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one RGB image [H, W, 3] in 0..1, got shape {image.shape}")
    return image


def colour_labels(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[H, W] int: −1 background, else the index in COLOUR_NAMES of the pixel's object colour.

    A pixel is object when its chroma reaches `threshold` × the chroma of the palette
    colour nearest to its hue.
    """
    chroma = image.max(axis=-1) - image.min(axis=-1)
    hue = _hue(image)
    dist = np.abs(hue[..., None] - _PALETTE_HUE)
    dist = np.minimum(dist, 360 - dist)
    nearest = dist.argmin(axis=-1)
    return np.where(chroma >= threshold * _PALETTE_CHROMA[nearest], nearest, -1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """Pixel coordinates [(N, 2) as (y, x)] of each 8-connected component of a boolean mask.

    Label propagation: every pixel starts with its own number and repeatedly takes the
    smallest number in its 3×3 neighbourhood within the mask, until nothing changes
    (run on the mask's bounding box only).
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return []
    oy, ox = ys.min(), xs.min()
    crop = mask[oy:ys.max() + 1, ox:xs.max() + 1]
    h, w = crop.shape
    big = h * w
    labels = np.where(crop, np.arange(big).reshape(h, w), big)
    padded = np.full((h + 2, w + 2), big)
    while True:
        padded[1:-1, 1:-1] = labels
        smallest = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(smallest, padded[dy:dy + h, dx:dx + w], out=smallest)
        smallest[~crop] = big
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    cy, cx = np.nonzero(crop)
    ids = labels[cy, cx]
    order = np.argsort(ids, kind="stable")
    cuts = np.flatnonzero(np.diff(ids[order])) + 1
    return [np.stack([cy[part] + oy, cx[part] + ox], axis=1) for part in np.split(order, cuts)]


@functools.lru_cache(maxsize=4096)
def template(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean [height, width]: pixels at least half covered by `shape` stretched to fill the box.

    In box coordinates u, v ∈ [0, 1] (v down): circle (u − ½)² + (v − ½)² ≤ ¼, square
    the whole box, triangle |u − ½| ≤ v / 2 (apex at the top).
    """
    n = TEMPLATE_SUPERSAMPLE
    v = ((np.arange(height * n) + 0.5) / (height * n))[:, None]
    u = ((np.arange(width * n) + 0.5) / (width * n))[None, :]
    if shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = np.ones((height * n, width * n), dtype=bool)
    elif shape == "triangle":
        inside = np.abs(u - 0.5) <= v / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(height, n, width, n).mean(axis=(1, 3)) >= 0.5


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template (stretched to the mask's box) overlaps a box-cropped mask best, and that IoU."""
    scores = {}
    for shape in SHAPES:
        t = template(shape, *mask.shape)
        scores[shape] = float((t & mask).sum() / max((t | mask).sum(), 1))
    best = max(scores, key=scores.get)
    return best, scores[best]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Boolean 3×3 dilation."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    return int(pixels[:, 1].min()), int(pixels[:, 0].min()), int(pixels[:, 1].max()) + 1, int(pixels[:, 0].max()) + 1


def _coverage(img: np.ndarray, labels: np.ndarray, ci: int, pixels: np.ndarray, pad: int
              ) -> tuple[np.ndarray, tuple[int, int, int, int], float]:
    """Coverage of colour `ci` around a candidate component, from a local colour model.

    In the component's box grown by `pad`: background b = median of the pixels at
    least one pixel away from any candidate, object colour o = median of the component's more saturated half,
    coverage c = clip(<p − b, o − b> / |o − b|², 0, 1), zero on pixels of other colours.
    Returns (c over the grown box, the grown box, chroma of o).
    """
    h, w = labels.shape
    x0, y0, x1, y1 = _box(pixels)
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    patch, lab = img[y0:y1, x0:x1], labels[y0:y1, x0:x1]
    free = patch[~_dilate(lab != -1)]  # one pixel clear of every candidate: no fringe in the median
    if len(free) == 0:
        free = img[labels == -1] if (labels == -1).any() else np.full((1, 3), 0.5)
    background = np.median(free, axis=0)
    own = img[pixels[:, 0], pixels[:, 1]]
    chroma = own.max(axis=-1) - own.min(axis=-1)
    colour = np.median(own[chroma >= np.median(chroma)], axis=0)
    direction = colour - background
    c = np.clip((patch - background) @ direction / max(float(direction @ direction), 1e-6), 0, 1)
    c[(lab != -1) & (lab != ci)] = 0
    return c, (x0, y0, x1, y1), float(colour.max() - colour.min())


def detect_objects(image, min_area: int | None = None) -> list[Detection]:
    """The objects in an image [H, W, 3] in 0..1, largest first.

    `min_area`: smallest object kept, in pixels (default 0.25% of the image: 10 px at 64×64).
    A detection's box holds the pixels at least half covered; its centre is the box centre.
    """
    img = as_image(image)
    h, w = img.shape[:2]
    min_area = max(4, round(0.0025 * h * w)) if min_area is None else min_area
    labels = colour_labels(img, CANDIDATE_CHROMA)
    found = []
    for ci, colour in enumerate(COLOUR_NAMES):
        for pixels in connected_components(labels == ci):
            if len(pixels) < min_area:
                continue
            c, (bx, by, _, _), chroma = _coverage(img, labels, ci, pixels, pad=3)
            if chroma < OBJECT_CHROMA * _PALETTE_CHROMA[ci]:
                continue  # a tinted patch of background, not an object
            parts = connected_components(c >= 0.5)
            core = max(parts, key=len) if parts else np.zeros((0, 2), dtype=int)
            if len(core) < min_area:
                continue
            x0, y0, x1, y1 = _box(core)
            mask = np.zeros(c.shape, dtype=bool)
            mask[core[:, 0], core[:, 1]] = True
            shape, _ = classify_shape(mask[y0:y1, x0:x1])
            box = (bx + x0, by + y0, bx + x1, by + y1)
            fill = len(core) / ((x1 - x0) * (y1 - y0))
            found.append(Detection(colour, shape, box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                                   len(core), fill))
    return sorted(found, key=lambda d: -d.area)


# ---------------------------------------------------------------- captions

_OBJECT = rf"(?:a|an) ({'|'.join(COLOUR_NAMES)}) ({'|'.join(SHAPES)})"
_PHRASE_TO_CELL = {phrase: cell for cell, phrase in POSITION_PHRASES.items()}
_POSITION_RX = re.compile(rf"^{_OBJECT} ({'|'.join(map(re.escape, _PHRASE_TO_CELL))})$")
_RELATION_RX = re.compile(rf"^{_OBJECT} ({'|'.join(RELATIONS)}) {_OBJECT}$")
_BARE_RX = re.compile(rf"^{_OBJECT}$")


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption asks for: objects (colour, shape), position words (object, (row, column)), relations."""

    objects: tuple[tuple[str, str], ...]
    positions: tuple[tuple[int, tuple[str, str]], ...] = ()
    relations: tuple[tuple[int, str, int], ...] = ()


def parse_caption(text: str) -> ParsedCaption:
    """Read a caption of the `scenes.py` grammar; the same (colour, shape) named twice is one object."""
    objects: list[tuple[str, str]] = []
    positions, relations = [], []

    def index(colour: str, shape: str) -> int:
        if (colour, shape) not in objects:
            objects.append((colour, shape))
        return objects.index((colour, shape))

    clean = " ".join(text.lower().replace(",", " ").split())
    if not clean:
        raise CaptionError("empty caption; expected e.g. 'a red circle in the top left'")
    for clause in clean.split(" and "):
        if m := _POSITION_RX.match(clause):
            positions.append((index(m.group(1), m.group(2)), _PHRASE_TO_CELL[m.group(3)]))
        elif m := _RELATION_RX.match(clause):
            relations.append((index(m.group(1), m.group(2)), m.group(3), index(m.group(4), m.group(5))))
        elif m := _BARE_RX.match(clause):
            index(m.group(1), m.group(2))
        else:
            raise CaptionError(
                f"cannot read {clause!r} of caption {text!r}: expected '<a colour shape> <position>' or "
                f"'<a colour shape> <relation> <a colour shape>' with colours {', '.join(COLOUR_NAMES)}, shapes "
                f"{', '.join(SHAPES)}, relations {', '.join(RELATIONS)}"
            )
    return ParsedCaption(tuple(objects), tuple(positions), tuple(relations))


# ---------------------------------------------------------------- scores

@dataclass(frozen=True)
class ImageScore:
    """How one image fits its caption.

    `objects_correct`: the detected (colour, shape) multiset equals the caption's.
    `objects_found`: how many of the caption's objects were detected. `spatial_*`:
    position words and relations that hold, of those the caption states (a missing
    object fails its statements).
    """

    objects_correct: bool
    objects_found: int
    objects_total: int
    spatial_correct: int
    spatial_total: int
    detections: tuple[Detection, ...]


def _best(detections: Sequence[Detection]) -> dict[tuple[str, str], Detection]:
    """The largest detection of each label (detections come largest first)."""
    out: dict[tuple[str, str], Detection] = {}
    for d in detections:
        out.setdefault(d.label, d)
    return out


def score_image(image, caption: str | ParsedCaption) -> ImageScore:
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    img = as_image(image)
    detections = detect_objects(img)
    best = _best(detections)
    size = (img.shape[1] + img.shape[0]) / 2
    ok = 0
    for i, cell in parsed.positions:
        d = best.get(parsed.objects[i])
        ok += d is not None and grid_cell(d.center, size) == cell
    for i, rel, j in parsed.relations:
        a, b = best.get(parsed.objects[i]), best.get(parsed.objects[j])
        ok += a is not None and b is not None and relation_holds(a.center, rel, b.center)
    return ImageScore(
        objects_correct=Counter(d.label for d in detections) == Counter(parsed.objects),
        objects_found=sum(label in best for label in parsed.objects),
        objects_total=len(parsed.objects),
        spatial_correct=int(ok),
        spatial_total=len(parsed.positions) + len(parsed.relations),
        detections=tuple(detections),
    )


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1); 0 when either is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def layout_ious(image, layout: Sequence[tuple[str, str, Sequence[float]]]) -> list[float]:
    """Per object (colour, shape, box in pixels) of a layout: IoU with the detection of that label (0 if none)."""
    best = _best(detect_objects(image))
    return [box_iou(best[(c, s)].bbox, box) if (c, s) in best else 0.0 for c, s, box in layout]


def psnr(reference, test, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(peak² / MSE), over all pixels and channels (inf if equal)."""
    a, b = np.asarray(_numpy(reference), np.float64), np.asarray(_numpy(test), np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)


def _numpy(x):
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x


def objects_rate(scores: Sequence[ImageScore]) -> float:
    """Share of the pictures whose detected objects are exactly the caption's."""
    return sum(bool(s.objects_correct) for s in scores) / len(scores)


def summarize(scores: Sequence[ImageScore]) -> dict[str, float]:
    """Rates over many images, split by how many objects the caption names."""
    out: dict[str, float] = {}
    by_count: dict[int, list[ImageScore]] = {}
    for s in scores:
        by_count.setdefault(s.objects_total, []).append(s)
    for n, group in sorted(by_count.items()):
        out[f"objects_correct_{n}"] = objects_rate(group)
    spatial = sum(s.spatial_total for s in scores)
    out["spatial_correct"] = sum(s.spatial_correct for s in scores) / spatial if spatial else float("nan")
    out["images"] = float(len(scores))
    return out


__all__ = [
    "Detection", "ParsedCaption", "ImageScore", "CaptionError", "detect_objects", "colour_labels",
    "classify_shape", "connected_components", "template", "parse_caption", "score_image", "box_iou", "layout_ious",
    "psnr", "summarize",
]
