"""The procedural evaluator: detection against scene ground truth (clean, noisy, blurred),
caption parsing, scores that fail when they should, IoU and PSNR known answers."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_core.lab.detector import (
    CaptionError,
    box_iou,
    detect_objects,
    layout_ious,
    parse_caption,
    psnr,
    score_image,
    summarize,
    template,
)
from ldm_core.lab.scenes import POSITION_PHRASES, make_scene

SCENES = [make_scene(23, i) for i in range(120)]


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (radius 3, replicate padding) of an [H, W, 3] image."""
    k = torch.exp(-torch.arange(-3, 4, dtype=torch.float64) ** 2 / (2 * sigma**2))
    k /= k.sum()
    x = torch.from_numpy(image).permute(2, 0, 1)[:, None].double()
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    return x[:, 0].permute(1, 2, 0).numpy()


def detection_stats(transform, count: int = 120) -> tuple[float, np.ndarray]:
    """(fraction of scenes whose detected labels are exactly the truth, IoU of every true object)."""
    exact, ious = 0, []
    for s in SCENES[:count]:
        image = transform(s)
        found = sorted(d.label for d in detect_objects(image))
        exact += found == sorted((o.colour, o.shape) for o in s.objects)
        ious += layout_ious(image, [(o.colour, o.shape, o.bbox) for o in s.objects])
    return exact / count, np.array(ious)


def test_detects_generated_scenes():
    # measured (120 scenes): exact 1.0, every IoU >= 0.95
    accuracy, ious = detection_stats(lambda s: s.image)
    assert accuracy >= 0.98
    assert (ious >= 0.9).mean() >= 0.98


def test_robust_to_mild_noise():
    rng = np.random.default_rng(0)
    # measured (400 scenes): exact 1.0, mean IoU 0.993
    accuracy, ious = detection_stats(lambda s: np.clip(s.image + rng.normal(0, 0.03, s.image.shape), 0, 1), 60)
    assert accuracy >= 0.97
    assert ious.mean() >= 0.95


def test_robust_to_mild_blur():
    # measured (400 scenes): exact 1.0, mean IoU 0.968 (blur moves 0.5-coverage edges of small shapes)
    accuracy, ious = detection_stats(lambda s: blur(s.image, 0.8), 60)
    assert accuracy >= 0.97
    assert ious.mean() >= 0.9


def test_empty_and_noisy_backgrounds_have_no_objects():
    rng = np.random.default_rng(1)
    grey = np.full((64, 64, 3), 0.5)
    tinted = np.clip(grey + np.array([0.06, -0.06, 0.0]) + rng.normal(0, 0.03, grey.shape), 0, 1)
    assert detect_objects(grey) == [] and detect_objects(tinted) == []


def test_captions_parse_back_to_the_truth_and_score_perfectly():
    for s in SCENES[:60]:
        parsed = parse_caption(s.caption)
        assert parsed.objects == tuple((o.colour, o.shape) for o in s.objects)
        assert parsed.positions == tuple((i, s.objects[i].cell) for i in s.positions)
        assert parsed.relations == s.relations
        score = score_image(torch.from_numpy(s.image)[None], s.caption)  # an IMAGE batch of one works too
        assert score.objects_correct and score.spatial_correct == score.spatial_total


def test_scores_fail_when_the_image_disagrees():
    single = next(s for s in SCENES if len(s.objects) == 1)
    o = single.objects[0]
    other_colour = "blue" if o.colour != "blue" else "red"
    assert not score_image(single.image, f"a {other_colour} {o.shape} {POSITION_PHRASES[o.cell]}").objects_correct
    other_shape = "square" if o.shape != "square" else "circle"
    assert not score_image(single.image, f"a {o.colour} {other_shape}").objects_correct
    wrong_cell = next(c for c in POSITION_PHRASES if c != o.cell)
    score = score_image(single.image, f"a {o.colour} {o.shape} {POSITION_PHRASES[wrong_cell]}")
    assert score.objects_correct and (score.spatial_correct, score.spatial_total) == (0, 1)
    # an extra object breaks exactness but not the found count
    pair = next(s for s in SCENES if len(s.objects) == 2)
    a = pair.objects[0]
    score = score_image(pair.image, f"a {a.colour} {a.shape}")
    assert not score.objects_correct and score.objects_found == 1
    # a relation stated backwards fails
    rel_scene = next(s for s in SCENES if s.relations)
    i, rel, j = rel_scene.relations[0]
    flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
    oi, oj = rel_scene.objects[i], rel_scene.objects[j]
    score = score_image(rel_scene.image, f"a {oi.colour} {oi.shape} {flipped} a {oj.colour} {oj.shape}")
    assert score.spatial_correct == 0
    rates = summarize([score_image(s.image, s.caption) for s in SCENES[:30]])
    assert rates["spatial_correct"] == 1.0 and rates["objects_correct_1"] == 1.0


def test_bad_captions_say_what_is_expected():
    with pytest.raises(CaptionError, match="purple"):
        parse_caption("a purple circle in the top left")
    with pytest.raises(CaptionError, match="empty caption"):
        parse_caption("  ")
    assert parse_caption("A red circle, and a blue square").objects == (("red", "circle"), ("blue", "square"))


def test_box_iou_and_psnr_known_answers():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    x = np.full((8, 8, 3), 0.5)
    assert psnr(x, x + 0.1) == pytest.approx(20.0)
    assert psnr(x, x) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:4])
    assert layout_ious(np.full((64, 64, 3), 0.5), [("red", "circle", (0, 0, 10, 10))]) == [0.0]


def test_templates_have_the_shape_areas():
    assert template("square", 40, 40).mean() == 1.0
    assert abs(template("circle", 40, 40).mean() - math.pi / 4) < 0.01
    assert abs(template("triangle", 40, 40).mean() - 0.5) < 0.02


def test_placement_bench_same_place_known_answers():
    """bench.placement's verdict: four centroids within 2 px of their mean are one place."""
    from bench.placement import same_place

    assert same_place([(50, 21), (50, 21), (51, 22), (49, 21)])
    assert not same_place([(14, 14), (50, 14), (14, 50), (50, 50)])  # the four corners: followed
    assert not same_place([(50, 21), None, (50, 21), (50, 21)])  # a prompt without a red object
    assert not same_place([(50, 21), (50, 21), (50, 21), (55, 21)])


def test_quality_bench_paired_difference_known_answer():
    """bench.quality's sampler comparison: per-prompt differences (1, 0, 0, -1, -1) → mean -0.2,
    standard error sd/√n with the unbiased sd √0.7."""
    from types import SimpleNamespace

    from bench.quality import paired_difference

    run = [SimpleNamespace(objects_correct=c) for c in (True, True, False, False, False)]
    ref = [SimpleNamespace(objects_correct=c) for c in (False, True, False, True, True)]
    mean, se = paired_difference(run, ref)
    assert mean == pytest.approx(-0.2)
    assert se == pytest.approx(0.7 ** 0.5 / 5 ** 0.5)


def test_quality_bench_within_five_points_counts_the_boundary():
    """bench.quality's sampler verdict: 84 of 100 against DDPM's 89 is exactly 5 points, within the
    issue's "within 5 points" (float subtraction alone gives 0.0500…04 and called it a fail); 6 is not."""
    from bench.quality import within_points

    assert 0.84 - 0.89 < -0.05  # the float artefact the helper absorbs
    assert within_points(0.84, 0.89) and within_points(0.90, 0.89)
    assert not within_points(0.83, 0.89)
