"""Tests for ldm_core.resize: known answers from ComfyUI, and properties of each method.

The *_KNOWN answers below were produced by ComfyUI v0.3.64's `comfy.utils.common_upscale`
(its functions run directly, torch 2.13 CPU). On that machine this module reproduces
them bit for bit; they are compared here with a tolerance of a few float32 ulps because
torch's vectorised acos/sin and fused multiply-adds may round differently on another
CPU. The lanczos answer is 8-bit (Pillow's integer arithmetic) and compared exactly.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm_core.imaging.resize import (
    CROP_METHODS,
    IMAGE_METHODS,
    LATENT_METHODS,
    ResizeError,
    center_crop_box,
    resize,
    scale_image,
    scale_image_by,
    upscale_latent,
    upscale_latent_by,
)

KNOWN = dict(rtol=1e-5, atol=1e-6)
TORCH_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
ALL_METHODS = LATENT_METHODS + ("lanczos",)

# [1, 2, 3, 4]: cell (0, 2) is a zero vector, cells (1, 0) and (1, 1) are antiparallel,
# cells (2, 0) and (2, 1) parallel.
X_1x2x3x4 = torch.tensor(
    [[[[1, 2, 0, -1], [0.5, -1, 2, 1], [3, 6, -2, 0.25]], [[0, 1, 0, 1], [2, -4, -1, 0.5], [-1, -2, 1, -0.5]]]]
)

BISLERP_1x2x3x4_TO_5x7_KNOWN = [
    1, 1.421736, 1.95178151, 0.707106531, -0.00799750816, -0.544322848, -0.99999994,
    1.22893751, 0.74808681, 2.46430826, 1.71868014, 0.270177692, 0.111052588, -0.03676733,
    0.5, -0.0357143581, -0.892857194, 1.32861221, 1.9881655, 1.50403762, 1,
    2.5686295, 1.18614268, 2.04327106, 3.71971107, -1.28063488, 0.535761893, 0.69460547,
    3, 3, 3, 1.63799942, -2.03078461, -0.481170684, 0.25,
    0, 0.237598673, 0.896380186, 0.353553265, 0.00799750816, 0.544322848, 0.99999994,
    0.720595539, -0.541962206, -1.24556613, -0.308658093, 0.826216757, 1.06302106, 1.29522002,
    2, -0.142857432, -3.57142878, -2.88869524, -0.834524512, 0.200414956, 0.5,
    0.900755584, -1.5556519, -2.67979455, 0.953660488, -1.70484865, -1.18634331, -0.36058715,
    -1, -1, -1, 3.95448399, 0.595437944, -1.05325866, -0.5,
]

BISLERP_2x3x4x6_CENTER_TO_3x3_KNOWN = [
    0.642527819, 1.12997437, -0.155066311, 0.591715813, 0.946147144, 0.846083283, -0.411802858, 0.961847365, 1.40263832,
    -0.215323105, -0.328801543, -0.85447681, 1.59556389, -0.843575001, -0.119706556, -0.274277896, -0.276582539, 0.67054075,
    -0.447148979, 0.959394991, -1.55388725, 0.303098321, -0.768676519, -0.469877869, -1.69568396, -0.915750325, 0.136269614,
    0.188093275, 1.25316894, 1.80004323, 0.952474892, 1.50578523, -0.00822497625, -0.326040566, 0.628339469, 0.898755133,
    -0.580843091, -0.0123129953, 0.683221281, 0.0254815556, -0.241815597, -0.673075736, 1.89209485, -1.2197665, 0.123990156,
    -1.14538574, -0.573202491, -0.433600783, -0.379589915, 0.163547143, -1.33792639, 0.497376084, -0.412439764, 0.0593018532,
]

BILINEAR_1x3x6x4_CENTER_TO_3x5_KNOWN = [
    0.375, 0.59375, 0.84375, 0.775000036, 0.25,
    0.46875, 0.6875, 0.671875, 0.496875018, 0.34375,
    0.5625, 0.78124994, 0.5, 0.21874997, 0.4375,
    0.4375, 0.65625, 0.375, 0.0937499851, 0.3125,
    0.53125, 0.75, 0.46875, 0.187499985, 0.40625,
    0.625, 0.84375, 0.5625, 0.28125, 0.5,
    0.5, 0.71875, 0.4375, 0.156249985, 0.375,
    0.59375, 0.8125, 0.53125, 0.25, 0.46875,
    0.6875, 0.90625, 0.625, 0.34375, 0.56250006,
]

LANCZOS_1x3x4x5_TO_3x7_X255_KNOWN = [
    4, 27, 109, 184, 197, 86, 0, 139, 196, 223, 142, 52, 101, 184, 47, 93, 114, 99, 204, 156, 48,
    125, 170, 227, 191, 60, 78, 168, 88, 143, 143, 83, 177, 175, 103, 48, 77, 181, 243, 141, 63, 72,
    152, 65, 0, 70, 164, 184, 157, 25, 83, 189, 226, 181, 89, 48, 205, 110, 52, 119, 94, 149, 224,
]


def _ramp(shape: tuple[int, ...], mul: int, mod: int, shift: int, div: float) -> torch.Tensor:
    """Deterministic, exactly representable test input."""
    n = math.prod(shape)
    return ((torch.arange(n) * mul % mod - shift).float() / div).reshape(shape)


# --- known answers (ComfyUI v0.3.64 common_upscale) -------------------------------------


def test_bislerp_known_answer_single_image():
    out = resize(X_1x2x3x4, 7, 5, "bislerp")
    expected = torch.tensor(BISLERP_1x2x3x4_TO_5x7_KNOWN).reshape(1, 2, 5, 7)
    torch.testing.assert_close(out, expected, **KNOWN)
    # Parallel pair (2, 0)-(2, 1): ComfyUI keeps the first vector instead of blending.
    assert out[0, :, 4, :3].tolist() == [[3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]]


def test_bislerp_known_answer_batch_with_center_crop():
    x = _ramp((2, 3, 4, 6), mul=7, mod=13, shift=6, div=4)
    out = resize(x, 3, 3, "bislerp", crop="center")
    expected = torch.tensor(BISLERP_2x3x4x6_CENTER_TO_3x3_KNOWN).reshape(2, 3, 3, 3)
    torch.testing.assert_close(out, expected, **KNOWN)


def test_bilinear_known_answer_tall_center_crop():
    x = _ramp((1, 3, 6, 4), mul=5, mod=17, shift=0, div=16)
    out = resize(x, 5, 3, "bilinear", crop="center")
    expected = torch.tensor(BILINEAR_1x3x6x4_CENTER_TO_3x5_KNOWN).reshape(1, 3, 3, 5)
    torch.testing.assert_close(out, expected, **KNOWN)


def test_lanczos_known_answer():
    x = _ramp((1, 3, 4, 5), mul=11, mod=41, shift=3, div=35)  # spans [-3/35, 37/35]: clipped both ends
    out = resize(x, 7, 3, "lanczos")
    expected = torch.tensor(LANCZOS_1x3x4x5_TO_3x7_X255_KNOWN, dtype=torch.float32).reshape(1, 3, 3, 7) / 255
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "old_w, old_h, w, h, box",
    [
        ((1920, 1080, 512, 512, (420, 0, 1080, 1080))),  # wide: trim left and right
        ((1080, 1920, 512, 512, (0, 420, 1080, 1080))),  # tall: trim top and bottom
        ((640, 480, 800, 600, (0, 0, 640, 480))),  # same aspect: nothing
        ((6, 4, 3, 3, (1, 0, 4, 4))),
        ((4, 6, 5, 3, (0, 2, 4, 2))),
        ((33, 20, 17, 29, (11, 0, 11, 20))),
        # margins of exactly x.5 round half to even, like Python's round()
        ((5, 5, 4, 5, (0, 0, 5, 5))),  # 0.5 -> 0
        ((7, 1, 2, 1, (2, 0, 3, 1))),  # 2.5 -> 2
        ((9, 1, 2, 1, (4, 0, 1, 1))),  # 3.5 -> 4
        ((1, 7, 1, 2, (0, 2, 1, 3))),
        ((1, 9, 1, 2, (0, 4, 1, 1))),
    ],
)
def test_center_crop_box_matches_comfyui(old_w, old_h, w, h, box):
    assert center_crop_box(old_w, old_h, w, h) == box


# --- crop ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("old_hw, new_wh", [((5, 12), (4, 4)), ((12, 5), (4, 4)), ((6, 6), (5, 4))])
def test_center_crop_is_resize_of_the_cropped_box(method, old_hw, new_wh):
    x = torch.rand(2, 3, *old_hw, generator=torch.Generator().manual_seed(0))
    left, top, kw, kh = center_crop_box(old_hw[1], old_hw[0], *new_wh)
    assert (kw < old_hw[1]) or (kh < old_hw[0])  # something was cropped
    cropped = x[..., top : top + kh, left : left + kw]
    assert torch.equal(resize(x, *new_wh, method, "center"), resize(cropped, *new_wh, method))


def test_crop_leaving_no_pixels():
    x = torch.rand(1, 3, 20, 19)  # to 55x2 the crop keeps 0 rows
    with pytest.raises(ResizeError, match="leaves no pixels"):
        resize(x, 55, 2, "bilinear", "center")
    # Pillow makes an empty image black, so ComfyUI's lanczos returns zeros here.
    assert torch.equal(resize(x, 55, 2, "lanczos", "center"), torch.zeros(1, 3, 2, 55))


# --- properties of the methods --------------------------------------------------------


@pytest.mark.parametrize("method", TORCH_METHODS)
def test_unchanged_size_is_identity(method):
    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(resize(x, 9, 7, method), x)


def test_unchanged_size_bislerp_is_identity_up_to_rounding():
    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(resize(x, 9, 7, "bislerp"), x)


def test_unchanged_size_lanczos_only_quantises():
    x = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(1)) * 1.4 - 0.2
    quantised = (x * 255).clamp(0, 255).floor() / 255  # truncation, not rounding
    assert torch.equal(resize(x, 9, 7, "lanczos"), quantised)


def test_lanczos_truncates_and_clips():
    assert torch.equal(resize(torch.full((1, 3, 6, 7), 0.999), 4, 9, "lanczos"), torch.full((1, 3, 9, 4), 254 / 255))
    assert torch.equal(resize(torch.full((1, 3, 6, 7), 1.5), 4, 9, "lanczos"), torch.ones(1, 3, 9, 4))
    assert torch.equal(resize(torch.full((1, 3, 6, 7), -0.5), 4, 9, "lanczos"), torch.zeros(1, 3, 9, 4))


@pytest.mark.parametrize("channels", [1, 5])
def test_lanczos_other_channel_counts_are_resized_per_channel(channels):
    x = torch.rand(2, channels, 9, 11, generator=torch.Generator().manual_seed(2))
    # each channel alone, as the first channel of a grey RGB image
    grey = [resize(x[:, c : c + 1].expand(-1, 3, -1, -1), 5, 4, "lanczos")[:, :1] for c in range(channels)]
    per_channel = torch.cat(grey, 1)
    assert torch.equal(resize(x, 5, 4, "lanczos"), per_channel)


def _two_cells(a: list[float], b: list[float]) -> torch.Tensor:
    """[1, C, 1, 2] with channel vectors a and b."""
    return torch.tensor([a, b]).T.reshape(1, -1, 1, 2)


# Resizing 2 -> 4 cells samples at source positions 0 (clamped), 0.25, 0.75, 1 (clamped).
def test_bislerp_slerps_unit_directions():
    out = resize(_two_cells([1.0, 0.0], [0.0, 1.0]), 4, 1, "bislerp")[0, :, 0].T
    angles = torch.tensor([0, 0.25, 0.75, 1]) * math.pi / 2
    torch.testing.assert_close(out, torch.stack((angles.cos(), angles.sin()), 1), rtol=0, atol=1e-6)


def test_bislerp_norms_are_bilinear_of_norms():
    x = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    out = resize(x, 12, 10, "bislerp")
    expected = F.interpolate(x.norm(dim=1, keepdim=True), size=(10, 12), mode="bilinear")
    torch.testing.assert_close(out.norm(dim=1, keepdim=True), expected, rtol=1e-5, atol=1e-6)


def test_bislerp_constant_direction_holds_the_lower_neighbour():
    # Directions that agree are not blended: ComfyUI returns the lower neighbour's
    # vector as is, so the norms are sampled at floor(position), not interpolated.
    norms = torch.rand(1, 1, 3, 4, generator=torch.Generator().manual_seed(4)) + 0.5
    direction = torch.tensor([0.6, -0.8, 0.0]).reshape(1, 3, 1, 1)
    out = resize(norms * direction, 8, 6, "bislerp")
    lower = lambda n, m: ((torch.arange(m) + 0.5) * n / m - 0.5).clamp(min=0).floor().long()
    held = norms[..., lower(3, 6), :][..., lower(4, 8)]
    torch.testing.assert_close(out, held * direction, rtol=0, atol=1e-6)
    assert not torch.allclose(out, F.interpolate(norms, size=(6, 8), mode="bilinear") * direction)


def test_bislerp_parallel_and_antiparallel_pairs():
    parallel = resize(_two_cells([1.0, 0.0], [3.0, 0.0]), 4, 1, "bislerp")[0, 0, 0]
    assert parallel.tolist() == [1.0, 1.0, 1.0, 3.0]
    antiparallel = resize(_two_cells([1.0, 0.0], [-1.0, 0.0]), 4, 1, "bislerp")[0, 0, 0]
    assert antiparallel.tolist() == [1.0, 0.5, -0.5, -1.0]  # lerped


def test_bislerp_zero_vectors():
    assert torch.equal(resize(torch.zeros(2, 4, 3, 3), 5, 6, "bislerp"), torch.zeros(2, 4, 6, 5))
    # A zero vector is treated as orthogonal to its neighbour: weight sin(tπ/2), norm t·|b|.
    out = resize(_two_cells([0.0, 0.0], [0.0, 2.0]), 4, 1, "bislerp")[0, 1, 0]
    t = torch.tensor([0, 0.25, 0.75, 1])
    torch.testing.assert_close(out, 2 * t * torch.sin(t * math.pi / 2), rtol=0, atol=1e-6)
    mixed = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    mixed[..., ::2, 1::2] = 0
    assert resize(mixed, 9, 7, "bislerp").isfinite().all()


def test_bislerp_batch_matches_single_images():
    # Not bit-equal: like ComfyUI, the channel sums of a batch run in another memory order.
    x = torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(6))
    single = torch.cat([resize(x[i : i + 1], 7, 9, "bislerp") for i in range(3)])
    torch.testing.assert_close(resize(x, 7, 9, "bislerp"), single)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_shape_and_dtype(method, dtype):
    x = torch.rand(2, 3, 5, 6).to(dtype)
    out = resize(x, 11, 4, method)
    assert out.shape == (2, 3, 4, 11) and out.dtype == dtype


@pytest.mark.parametrize("method", ["bislerp", "bicubic"])
def test_extra_dims_are_frames(method):
    x = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(7))  # [B, C, T, H, W]
    out = resize(x, 8, 7, method)
    frames = torch.stack([resize(x[:, :, t].contiguous(), 8, 7, method) for t in range(3)], 2)
    assert out.shape == (2, 4, 3, 7, 8)
    torch.testing.assert_close(out, frames)


# --- names and errors -------------------------------------------------------------------


def test_dropdown_orders():
    assert LATENT_METHODS == ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
    assert IMAGE_METHODS == ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
    assert CROP_METHODS == ("disabled", "center")


def test_errors_name_the_choices():
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="bislerp, lanczos"):
        resize(x, 4, 4, "cubic")
    with pytest.raises(ResizeError, match="disabled, center"):
        resize(x, 4, 4, "bilinear", crop="middle")
    with pytest.raises(ResizeError, match="nearest-exact, bilinear, area, bicubic, bislerp$"):
        upscale_latent(x, "lanczos", 64, 64, "disabled")
    with pytest.raises(ResizeError, match="bicubic, lanczos$"):
        scale_image(torch.zeros(1, 8, 8, 3), "bislerp", 4, 4, "disabled")
    with pytest.raises(ResizeError, match="at least 1x1"):
        upscale_latent_by(x, "area", 0.05)  # rounds to 0 cells


# --- node semantics ---------------------------------------------------------------------


def _latent(h: int, w: int) -> torch.Tensor:
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(8))


def test_upscale_latent_sizes():
    lat = _latent(10, 20)
    assert upscale_latent(lat, "bilinear", 0, 0, "disabled") is lat
    assert upscale_latent(lat, "bilinear", 256, 128, "disabled").shape[-2:] == (16, 32)
    assert upscale_latent(lat, "bilinear", 260, 135, "disabled").shape[-2:] == (16, 32)  # floor-divided by 8
    assert upscale_latent(lat, "bilinear", 8, 520, "disabled").shape[-2:] == (65, 8)  # each at least 64 px
    # 0 keeps the aspect ratio, from the other size after its clamp to 64 px: 64 * 20/10.
    assert upscale_latent(lat, "bilinear", 0, 40, "disabled").shape[-2:] == (8, 16)
    assert upscale_latent(lat, "bilinear", 400, 0, "disabled").shape[-2:] == (25, 50)
    assert upscale_latent(_latent(30, 2), "bilinear", 0, 256, "disabled").shape[-2:] == (32, 8)  # derived one clamped
    assert upscale_latent(lat, "bilinear", 256, 128, "disabled", factor=16).shape[-2:] == (8, 16)


def test_upscale_latent_matches_resize():
    lat = _latent(10, 20)
    assert torch.equal(upscale_latent(lat, "bislerp", 96, 200, "center"), resize(lat, 12, 25, "bislerp", "center"))


@pytest.mark.parametrize("w, scale_by, new_w", [(5, 1.5, 8), (3, 1.5, 4), (7, 0.5, 4), (5, 0.5, 2), (64, 1.25, 80)])
def test_scale_by_rounds_half_to_even(w, scale_by, new_w):
    assert upscale_latent_by(_latent(2, w), "nearest-exact", scale_by).shape[-2:] == (round(2 * scale_by), new_w)
    image = torch.rand(1, 2, w, 3)
    assert scale_image_by(image, "nearest-exact", scale_by).shape == (1, round(2 * scale_by), new_w, 3)


def test_scale_image_sizes():
    image = torch.rand(2, 4, 10, 3)  # [B, H, W, C]
    assert scale_image(image, "bilinear", 0, 0, "disabled") is image
    assert scale_image(image, "bilinear", 7, 3, "disabled").shape == (2, 3, 7, 3)
    assert scale_image(image, "bilinear", 0, 6, "disabled").shape == (2, 6, 15, 3)
    assert scale_image(torch.rand(1, 2, 5, 3), "bilinear", 0, 1, "disabled").shape == (1, 1, 2, 3)  # 2.5 -> 2
    assert scale_image(torch.rand(1, 100, 1, 3), "bilinear", 0, 1, "disabled").shape == (1, 1, 1, 3)  # at least 1
    assert scale_image(image, "bilinear", 25, 0, "disabled").shape == (2, 10, 25, 3)


def test_scale_image_is_resize_in_channels_last():
    image = torch.rand(2, 6, 9, 3, generator=torch.Generator().manual_seed(9))
    out = scale_image(image, "lanczos", 5, 4, "center")
    assert torch.equal(out, resize(image.movedim(-1, 1), 5, 4, "lanczos", "center").movedim(1, -1))
    out = scale_image_by(image, "bicubic", 1.5)
    assert torch.equal(out, resize(image.movedim(-1, 1), 14, 9, "bicubic").movedim(1, -1))
