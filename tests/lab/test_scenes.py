"""Procedural scenes: determinism, anti-aliased coverage (known areas), ground truth consistency."""
import math

import numpy as np
import pytest

from ldm_core.errors import ConfigError
from ldm_core.lab.scenes import (
    COLOUR_NAMES,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SceneConfig,
    class_id,
    coverage,
    grid_cell,
    make_scene,
    relation_between,
    relation_holds,
    scene_stream,
)

SCENES = [make_scene(11, i) for i in range(120)]


def test_same_seed_and_index_give_the_same_scene():
    a, b = make_scene(5, 17), make_scene(5, 17)
    assert a.caption == b.caption and np.array_equal(a.image, b.image) and np.array_equal(a.semantic, b.semantic)
    assert not np.array_equal(make_scene(5, 18).image, a.image)
    assert not np.array_equal(make_scene(6, 17).image, a.image)
    stream = scene_stream(5, start=16)
    next(stream)
    assert next(stream).caption == a.caption  # item i of the stream is make_scene(seed, i)


@pytest.mark.parametrize("shape, area", [
    ("circle", math.pi * 9.3**2), ("square", (2 * 0.9 * 9.3) ** 2), ("triangle", 2 * 9.3**2),
])
def test_coverage_integrates_to_the_exact_area(shape, area):
    cov = coverage(shape, 31.37, 30.81, 9.3, 64, 5)
    assert abs(cov.sum() - area) / area < 0.015  # 5×5 samples per pixel: measured 0.1% to 1.1%
    assert cov.min() >= 0 and cov.max() == 1
    assert ((cov > 0) & (cov < 1)).any()  # anti-aliased edge pixels exist


def test_ground_truth_matches_the_image():
    for s in SCENES:
        n = len(s.objects)
        assert 1 <= n <= 3 and s.image.shape == (64, 64, 3) and s.image.dtype == np.float32
        assert s.instances.shape == (n, 64, 64)
        assert s.instances.sum(axis=0).max() <= 1 + 1e-6  # objects never overlap
        for k, o in enumerate(s.objects):
            mask = s.semantic == class_id(o.colour, o.shape)
            assert np.array_equal(mask, s.instances[k] >= 0.5)
            ys, xs = np.nonzero(mask)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            full = s.instances[k] == 1
            assert np.allclose(s.image[full], o.rgb, atol=1e-6)  # fully covered pixels have the object colour
        bg = s.semantic == 0
        assert bg.sum() > 0.5 * 64 * 64


def test_captions_state_what_is_true():
    for s in SCENES:
        for i in s.positions:
            assert POSITION_PHRASES[s.objects[i].cell] in s.caption
        for i, rel, j in s.relations:
            assert f"{s.objects[i].colour} {s.objects[i].shape} {rel} a" in s.caption
            assert relation_holds(s.objects[i].center, rel, s.objects[j].center)
        for o in s.objects:
            assert f"{o.colour} {o.shape}" in s.caption
        assert len(s.positions) + 2 * len(s.relations) == len(s.objects)


def test_the_stream_covers_the_vocabulary():
    shapes = {o.shape for s in SCENES for o in s.objects}
    colours = {o.colour for s in SCENES for o in s.objects}
    cells = {o.cell for s in SCENES for o in s.objects}
    relations = {r for s in SCENES for _, r, _ in s.relations}
    counts = {len(s.objects) for s in SCENES}
    gradients = sum(s.background[0] != s.background[1] for s in SCENES)
    assert shapes == set(SHAPES) and colours == set(COLOUR_NAMES) and counts == {1, 2, 3}
    assert cells == set(POSITION_PHRASES) and relations == set(RELATIONS)
    assert 20 < gradients < 100


def test_relations_and_cells_known_answers():
    assert relation_between((10, 30), (50, 35)) == "left of"
    assert relation_between((50, 30), (10, 35)) == "right of"
    assert relation_between((30, 5), (32, 50)) == "above"
    assert relation_between((30, 50), (32, 5)) == "below"
    assert grid_cell((5, 5), 64) == ("top", "left") and grid_cell((32, 60), 64) == ("bottom", "center")
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds((0, 0), "near", (1, 1))


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="supersample must be odd"):
        SceneConfig(supersample=4)
    with pytest.raises(ConfigError, match="size_range"):
        SceneConfig(size_range=(0.1, 0.3))
    with pytest.raises(ConfigError, match="object_counts"):
        SceneConfig(object_counts=(1, 4), count_weights=(1, 1))
    with pytest.raises(ValueError, match="non-negative"):
        make_scene(-1)


def test_other_sizes_render():
    s = make_scene(0, 3, SceneConfig(size=96))
    assert s.image.shape == (96, 96, 3) and s.objects[0].image_size == 96
