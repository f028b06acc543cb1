"""Procedural scenes with ground truth: the training data of the embedded model, no download.

A scene is a square image (64×64 by default) with one to three flat-coloured objects
(circle, square, triangle; red, green, blue, yellow) of random size and position on a
plain or linear-gradient, low-saturation background, together with everything true
about it: a caption from a small grammar, each object's bounding box, a semantic map
and one mask per instance.

Everything is a pure function of a seed: `make_scene(seed, index)` draws from
`numpy.random.default_rng([seed, index])`, so item i of a stream never depends on the
items before it (a resumed training run sees exactly the data it would have seen).

Rendering is anti-aliased by supersampling: each object's indicator function is
evaluated on an s×s grid of sub-pixel centres per pixel and averaged (s odd, 5 by
default), which gives the pixel's coverage c ∈ [0, 1]; the pixel is background·(1 − c) + colour·c.
Objects never overlap (their boxes keep a gap of `min_gap` pixels), so coverages add.

Caption grammar (what `evaluate.parse_caption` reads back):

    caption  := clause (" and " clause)*
    clause   := object " " position | object " " relation " " object
    object   := "a " colour " " shape          (e.g. "a red circle")
    position := "in the top left" | "at the top" | "in the top right" | "on the left"
              | "in the center" | "on the right" | "in the bottom left" | "at the bottom"
              | "in the bottom right"
    relation := "left of" | "right of" | "above" | "below"

An object's position word is the cell of a 3×3 grid holding its centre. A relation
"A left of B" is true when B's centre minus A's has its larger component along x and
that component is positive (likewise right of: negative x; above: positive y, image
rows growing downwards; below: negative y).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ldm_core.errors import ConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.13, 0.12),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.14, 0.30, 0.88),
    "yellow": (0.95, 0.84, 0.10),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
# (row, column) of the 3×3 grid -> the words a caption uses for it.
POSITION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Sizes are fractions of the image side.

    `size_range`: half-extent of an object (circle radius; half the side of the
    square's and triangle's bounding box). `object_counts` / `count_weights`: how many
    objects a scene has, with what probability. `relation_prob`: chance that a scene
    of two or more objects describes the first two by a relation instead of two positions.
    `cell_margin`: centres keep this fraction of a grid cell away from the cell's borders.
    """

    size: int = 64
    supersample: int = 5
    size_range: tuple[float, float] = (0.09, 0.16)
    object_counts: tuple[int, ...] = (1, 2, 3)
    count_weights: tuple[float, ...] = (0.4, 0.35, 0.25)
    gradient_prob: float = 0.5
    relation_prob: float = 0.5
    min_gap: float = 2.0
    cell_margin: float = 0.12
    colour_jitter: float = 0.04

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ConfigError(f"SceneConfig.size must be at least 16 pixels, got {self.size}")
        if self.supersample < 1 or self.supersample % 2 == 0:
            # odd: no pixel is exactly half covered, so "at least half covered" has no ties
            raise ConfigError(f"SceneConfig.supersample must be odd and >= 1, got {self.supersample}")
        lo, hi = self.size_range
        if not 0 < lo <= hi <= 1 / 6:
            raise ConfigError(f"SceneConfig.size_range must satisfy 0 < lo <= hi <= 1/6, got {self.size_range}")
        if len(self.object_counts) != len(self.count_weights) or not self.object_counts:
            raise ConfigError("SceneConfig: object_counts and count_weights need one weight per count")
        if not 0 <= self.cell_margin < 0.5:
            raise ConfigError(f"SceneConfig.cell_margin must lie in [0, 0.5), got {self.cell_margin}")
        if min(self.object_counts) < 1 or max(self.object_counts) > 3:
            raise ConfigError(f"SceneConfig.object_counts must lie in 1..3, got {self.object_counts}")


@dataclass(frozen=True)
class SceneObject:
    """One object. `bbox` = (x0, y0, x1, y1) in pixels, half-open, of the pixels at least half covered."""

    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in pixels, continuous
    half_size: float
    bbox: tuple[int, int, int, int]
    rgb: tuple[float, float, float]

    image_size: int = 64

    @property
    def cell(self) -> tuple[str, str]:
        """(row, column) of the 3×3 grid cell holding the centre."""
        return grid_cell(self.center, self.image_size)

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An image [H, W, 3] float32 in 0..1 and its ground truth.

    `semantic` [H, W] int64: 0 background, else `class_id(colour, shape)` of the object
    covering at least half the pixel. `instances` [N, H, W] float32: each object's
    coverage. `relations`: (i, relation, j) triples the caption states.
    """

    image: np.ndarray
    objects: tuple[SceneObject, ...]
    caption: str
    semantic: np.ndarray
    instances: np.ndarray
    positions: tuple[int, ...] = ()  # indices of objects whose position the caption states
    relations: tuple[tuple[int, str, int], ...] = ()
    background: tuple[tuple[float, float, float], tuple[float, float, float], float] = field(
        default=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.0))  # (colour a, colour b, angle)

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def boxes(self) -> np.ndarray:
        """[N, 4] boxes (x0, y0, x1, y1) as fractions of the image side (for layout tokens)."""
        return np.array([o.bbox for o in self.objects], dtype=np.float32).reshape(-1, 4) / self.size


def class_id(colour: str, shape: str) -> int:
    """1 + index of (colour, shape) among all combinations (0 is background)."""
    return 1 + COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


NUM_CLASSES = 1 + len(COLOUR_NAMES) * len(SHAPES)


def grid_cell(center: tuple[float, float], size: int) -> tuple[str, str]:
    """(row, column) of the 3×3 grid cell holding a point (x, y) of a size×size image."""
    x, y = center
    col = min(2, max(0, int(3 * x / size)))
    row = min(2, max(0, int(3 * y / size)))
    return ROWS[row], COLUMNS[col]


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation word that makes "A <word> B" true for centres a and b (see the module docstring)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def relation_holds(a: tuple[float, float], relation: str, b: tuple[float, float]) -> bool:
    """Whether "A <relation> B" is true for centres a and b."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
    return relation_between(a, b) == relation


def shape_indicator(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    """Boolean mask of the points (x, y) inside a shape of half-extent s centred at (cx, cy).

    circle: radius s. square: side 2·0.9·s (its box nearly matches the circle's).
    triangle: pointing up, apex (cx, cy − s), base y = cy + s from cx − s to cx + s.
    """
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= s * s
    if shape == "square":
        h = 0.9 * s
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":
        # Half-width grows linearly from 0 at the apex to s at the base.
        t = (y - (cy - s)) / (2 * s)
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * s)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def coverage(shape: str, cx: float, cy: float, s: float, size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel [size, size] inside the shape, from supersample² sub-pixel samples."""
    n = size * supersample
    sub = (np.arange(n, dtype=np.float64) + 0.5) / supersample  # sub-pixel centres in pixel units
    inside = shape_indicator(shape, sub[None, :], sub[:, None], cx, cy, s)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def _background(rng: np.random.Generator, config: SceneConfig) -> tuple[np.ndarray, tuple]:
    """Plain or linear-gradient background of low saturation (chroma ≤ 0.12), so objects stand out."""
    def colour() -> np.ndarray:
        grey = rng.uniform(0.2, 0.85)
        tint = rng.uniform(-0.06, 0.06, size=3)
        return np.clip(grey + tint, 0, 1)

    a = colour()
    b = colour() if rng.random() < config.gradient_prob else a.copy()
    angle = float(rng.uniform(0, 2 * np.pi))
    n = config.size
    coords = (np.arange(n) + 0.5) / n - 0.5
    proj = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # in [-0.71, 0.71]
    t = np.clip(proj / np.sqrt(0.5) * 0.5 + 0.5, 0, 1)[..., None]
    image = (a * (1 - t) + b * t).astype(np.float32)
    return image, (tuple(map(float, a)), tuple(map(float, b)), angle)


def _place(rng: np.random.Generator, count: int, config: SceneConfig) -> list[tuple[float, float, float]] | None:
    """Centres and half-sizes for `count` objects in distinct grid cells, boxes `min_gap` apart; None if stuck."""
    n = config.size
    cells = rng.permutation(9)[:count]
    placed: list[tuple[float, float, float]] = []
    for cell in cells:
        row, col = divmod(int(cell), 3)
        s = rng.uniform(*config.size_range) * n
        # Centre inside the cell less a margin (position words stay clear-cut), the object
        # inside the image with a 1-pixel margin.
        m = config.cell_margin * n / 3
        x_lo, x_hi = max(col * n / 3 + m, s + 1), min((col + 1) * n / 3 - m, n - s - 1)
        y_lo, y_hi = max(row * n / 3 + m, s + 1), min((row + 1) * n / 3 - m, n - s - 1)
        if x_lo >= x_hi or y_lo >= y_hi:
            return None
        cx, cy = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
        for px, py, ps in placed:
            if abs(cx - px) < s + ps + config.min_gap and abs(cy - py) < s + ps + config.min_gap:
                return None
        placed.append((float(cx), float(cy), float(s)))
    return placed


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(colour: str, shape: str) -> str:
    return f"{article(colour)} {colour} {shape}"


def _caption(rng: np.random.Generator, objects: list[SceneObject], config: SceneConfig
             ) -> tuple[str, tuple[int, ...], tuple[tuple[int, str, int], ...]]:
    phrases = [object_phrase(o.colour, o.shape) for o in objects]
    clauses, positions, relations = [], [], []
    start = 0
    if len(objects) >= 2 and rng.random() < config.relation_prob:
        rel = relation_between(objects[0].center, objects[1].center)
        clauses.append(f"{phrases[0]} {rel} {phrases[1]}")
        relations.append((0, rel, 1))
        start = 2
    for i in range(start, len(objects)):
        clauses.append(f"{phrases[i]} {POSITION_PHRASES[objects[i].cell]}")
        positions.append(i)
    return " and ".join(clauses), tuple(positions), tuple(relations)


def make_scene(seed: int, index: int = 0, config: SceneConfig = SceneConfig()) -> Scene:
    """Scene number `index` of the stream `seed`: a pure function of (seed, index, config)."""
    if seed < 0 or index < 0:
        raise ValueError(f"make_scene: seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    count = int(rng.choice(config.object_counts, p=np.asarray(config.count_weights) / sum(config.count_weights)))
    combos = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    kinds = [combos[i] for i in rng.permutation(len(combos))[:count]]
    placed = None
    while placed is None:
        placed = _place(rng, count, config)
    image, background = _background(rng, config)
    n = config.size
    semantic = np.zeros((n, n), dtype=np.int64)
    instances = np.zeros((count, n, n), dtype=np.float32)
    objects = []
    for k, ((colour, shape), (cx, cy, s)) in enumerate(zip(kinds, placed)):
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-1, 1, 3) * config.colour_jitter, 0, 1)
        cov = coverage(shape, cx, cy, s, n, config.supersample)
        image = image * (1 - cov[..., None]) + rgb.astype(np.float32) * cov[..., None]
        instances[k] = cov
        semantic[cov >= 0.5] = class_id(colour, shape)
        objects.append(SceneObject(shape, colour, (cx, cy), s, _bbox(cov >= 0.5), tuple(map(float, rgb)), n))
    caption, positions, relations = _caption(rng, objects, config)
    return Scene(np.clip(image, 0, 1).astype(np.float32), tuple(objects), caption, semantic, instances,
                 positions, relations, background)


def scene_stream(seed: int, start: int = 0, config: SceneConfig = SceneConfig()) -> Iterator[Scene]:
    """The unlimited stream of scenes `seed`, from item `start` on."""
    index = start
    while True:
        yield make_scene(seed, index, config)
        index += 1


__all__ = [
    "SHAPES", "COLOURS", "COLOUR_NAMES", "POSITION_PHRASES", "RELATIONS", "ROWS", "COLUMNS", "NUM_CLASSES",
    "SceneConfig", "SceneObject", "Scene", "make_scene", "scene_stream", "class_id", "grid_cell",
    "relation_between", "relation_holds", "shape_indicator", "coverage", "object_phrase",
]
