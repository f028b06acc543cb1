"""Per-step latent previews: the fitted latent→RGB map, and ComfyUI's progress hook."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_core.checkpoints.synthetic import random_state_dict
from ldm_core.imaging.preview import LatentPreviewer, colour_fields
from ldm_core.loading.model import VAE
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.presets import PRESETS, shrink
from ldm_nodes.comfy_adapter import ComfyProgress


class LinearVAE:
    """An encoder with a known answer: z = M·avgpool_f(rgb) + c (4 channels from 3 colours)."""

    factor = 8
    M = torch.tensor([[0.9, -0.3, 0.2], [0.1, 0.7, -0.5], [-0.4, 0.2, 0.8], [0.3, 0.3, 0.3]])
    c = torch.tensor([0.1, -0.2, 0.05, 0.0])

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(image.movedim(-1, 1), self.factor)
        return torch.einsum("kc,bchw->bkhw", self.M, pooled) + self.c[:, None, None]


def test_fit_recovers_a_known_linear_encoder() -> None:
    vae = LinearVAE()
    previewer = LatentPreviewer.fit(vae, latent_scale=0.5)
    # Held-out images (another seed): the fitted map inverts the encoder on model-space latents.
    images = colour_fields(5, 32, seed=99)
    z_model = vae.encode(images) * 0.5
    expected = F.avg_pool2d(images.movedim(-1, 1), 8).movedim(1, -1)
    err = (previewer.rgb(z_model) - expected).abs().max().item()
    assert err < 1e-4, err


def test_preview_is_uint8_at_latent_resolution_of_the_first_image() -> None:
    previewer = LatentPreviewer.fit(LinearVAE())
    x0 = torch.randn(2, 4, 6, 10)
    picture = previewer(x0)
    assert picture.dtype == np.uint8 and picture.shape == (6, 10, 3)
    np.testing.assert_array_equal(picture, (previewer.rgb(x0[:1])[0] * 255).round().byte().numpy())


def test_fit_runs_on_a_real_layout_vae_and_tracks_colour() -> None:
    config = shrink(PRESETS["sd1"]).vae
    module = AutoencoderKL(config)
    module.load_state_dict(random_state_dict(AutoencoderKL, config, seed=3))
    vae = VAE(module.eval(), config, torch.device("cpu"), torch.float32)
    previewer = LatentPreviewer.fit(vae, latent_scale=0.18215, n_images=6, size=32)
    assert previewer.weight.shape == (3, config.embed_dim) and torch.isfinite(previewer.weight).all()
    # In-sample, the fit is the least-squares optimum: it beats predicting the mean colour.
    images = colour_fields(6, 32)
    target = F.avg_pool2d(images.movedim(-1, 1), vae.factor).movedim(1, -1)
    fitted = previewer.rgb(vae.encode(images) * 0.18215)
    assert ((fitted - target) ** 2).mean() < ((target.mean((0, 1, 2)) - target) ** 2).mean()


def test_channels_fallback_shows_structure() -> None:
    previewer = LatentPreviewer.channels(4)
    x0 = torch.zeros(1, 4, 3, 3)
    x0[0, 0, 1, 1] = 2.0
    picture = previewer(x0)
    assert picture[1, 1, 0] == 255 and picture[0, 0, 0] == 128


@pytest.fixture
def fake_comfy(monkeypatch):
    """Just enough of ComfyUI's `comfy.utils.ProgressBar` and `comfy.cli_args.args`."""
    calls: list[tuple] = []

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id = total, node_id

        def update_absolute(self, value, total=None, preview=None):
            calls.append((value, total, preview))

    args = types.SimpleNamespace(preview_method=types.SimpleNamespace(value="none"), preview_size=384)
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = args
    comfy.utils, comfy.cli_args = utils, cli_args
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    return calls, args


def test_comfy_progress_sends_previews_only_when_comfy_shows_them(fake_comfy) -> None:
    calls, args = fake_comfy
    asked = []

    def preview():
        asked.append(1)
        return np.full((4, 6, 3), 200, np.uint8)

    progress = ComfyProgress("7")
    progress.start(3)
    progress.update(1, 3, preview=preview)
    assert calls[-1] == (1, 3, None) and not asked  # previews off: never computed

    args.preview_method.value = "latent2rgb"
    progress.start(3)
    progress.update(2, 3, preview=preview)
    fmt, image, size = calls[-1][2]
    assert (fmt, size, image.size) == ("JPEG", 384, (6, 4)) and asked == [1]
    assert np.asarray(image)[0, 0].tolist() == [200, 200, 200]


def test_a_failing_preview_never_fails_the_run(fake_comfy) -> None:
    calls, args = fake_comfy
    args.preview_method.value = "auto"

    def broken():
        raise RuntimeError("boom")

    progress = ComfyProgress()
    progress.start(2)
    progress.update(1, 2, preview=broken)
    progress.update(2, 2, preview=broken)
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)] and all(c[2] is None for c in calls)


def test_vae_preview_fits_once_on_first_use() -> None:
    encodes = []

    class Counting(LinearVAE):
        def encode(self, image):
            encodes.append(1)
            return super().encode(image)

    from ldm_core.imaging.preview import VAEPreview

    preview = VAEPreview(Counting(), 1.0)
    assert not encodes
    a = preview(torch.randn(1, 4, 5, 5))
    b = preview(torch.randn(1, 4, 5, 5))
    assert len(encodes) == 1 and a.shape == b.shape == (5, 5, 3)
