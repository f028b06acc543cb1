"""Stage 1, perceptual compression: an AutoencoderKL trained on scenes.

Loss per batch (images x ∈ [−1, 1], reconstruction x̂ = D(z), z ~ q(z|x) = N(μ, σ²)):

    L = mean|x − x̂| + w_mse·mean(x − x̂)² + w_ssim·(1 − SSIM(x, x̂)) + w_kl·KL(q ‖ N(0, I)) / (3·H·W)
        [+ w_adv·(−mean D_φ(x̂))  after `disc_start` steps]

KL = ½ Σ (μ² + σ² − 1 − log σ²) summed over the latent of one image, averaged over
the batch; dividing by the pixel count makes w_kl the paper's weight on a
pixel-summed reconstruction loss (1e-6). SSIM (kornia, Gaussian window) stands in for
the perceptual term, which would need downloaded VGG weights. The optional patch
discriminator D_φ (a few strided convolutions scoring overlapping patches) is trained
with the hinge loss mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.lab.detector import psnr
from ldm_core.lab.scenes import SceneConfig
from ldm_core.lab.train.loop import Stage, cosine_lr, image_grid, seeded
from ldm_core.lab.train.scene_batches import heldout_batch, scene_batch, scene_config_from_dict, scene_config_to_dict
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.config import VAEConfig, _Config

# The first stage: f = 4 (64×64 scenes → 16×16×4 latents), narrow. Four channels per
# GroupNorm group: with 32 groups of one channel each (SD's 32 groups on a 32-wide first
# level) every channel's image mean is normalised away and flat colours train far slower
# (measured: 15 dB vs 19 dB held-out PSNR after ~110 steps).
SCENES_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8)


@dataclass(frozen=True)
class AutoencoderTrainConfig(_Config):
    vae: VAEConfig = field(default_factory=lambda: SCENES_VAE)
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.99)
    lr_steps: int = 2500  # cosine decay of the learning rate from lr to lr_final over this many steps
    lr_final: float = 5e-5
    logvar_init: float = -6.0  # initial log σ² of q(z|x): start nearly deterministic (the KL weight is tiny)
    mse_weight: float = 0.0  # an L2 term on top of L1: large (colour) errors get gradients in proportion
    ssim_weight: float = 0.25
    ssim_window: int = 7
    kl_weight: float = 1e-6
    decoder_only: bool = False  # refine: train the decoder on a frozen encoder (the latent space stays put)
    disc_weight: float = 0.0  # 0: no adversarial term (and no discriminator)
    disc_start: int = 0
    disc_channels: int = 32
    data_seed: int = 0
    init_seed: int = 0


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over all but the batch axis: [B]."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)


class PatchDiscriminator(nn.Module):
    """Scores overlapping patches real/fake: [B, 3, H, W] → [B, 1, H/4 − 1, W/4 − 1] logits."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 1, 4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int) -> torch.Tensor:
    """Mean SSIM of images in [−1, 1] (computed on [0, 1])."""
    import kornia

    return kornia.metrics.ssim((x + 1) / 2, (y + 1) / 2, window, max_val=1.0).mean()


def build_autoencoder(config: VAEConfig, seed: int, logvar_init: float | None = None) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL; the seed alone decides its weights. `logvar_init`
    sets the bias of the posterior's log-variance channels (None: PyTorch's default init)."""
    ae = seeded(AutoencoderKL, config, seed)
    if logvar_init is not None:
        with torch.no_grad():
            ae.quant_conv.bias[config.embed_dim:] = logvar_init
    return ae


# Stage 1 as `ldm-train stage1` trains it: L1 plus 5·L2. With L1 alone every pixel's error pulls with
# the same force, so a wrong colour on a small object (an error of 2 in one channel) weighs no more
# than a slightly soft edge; on one CPU a run learned red as yellow and stopped at 24.8 dB.
STAGE1 = dict(mse_weight=5.0)

# Refining the decoder on the frozen stage-1 encoder (`ldm-train refine`): stage 2 trains on
# the encoder's latents, so the decoder may go on learning while (or after) stage 2 runs.
# Same loss as stage 1 (STAGE1's L2 term), its own short schedule.
REFINE = dict(STAGE1, decoder_only=True, lr=5e-4, lr_steps=1000, lr_final=2e-5)


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, folder: str | Path, config: AutoencoderTrainConfig = AutoencoderTrainConfig(),
                 scenes: SceneConfig = SceneConfig(), init: AutoencoderKL | None = None,
                 device: str | torch.device = "cpu") -> None:
        """`init`: start from these weights (a refine run starts from its stage-1 autoencoder).
        `device`: where the networks train; scenes and the posterior's noise still come from the
        CPU generator, and the saved state is device-free."""
        super().__init__(folder, config.init_seed)
        self.config, self.scenes = config, scenes
        self.device = torch.device(device)
        self.ae = build_autoencoder(config.vae, config.init_seed, config.logvar_init)
        if init is not None:
            self.ae.load_state_dict(init.state_dict())
        self.ae.to(self.device)
        self.modules["ae"] = self.ae
        params = self.ae.parameters()
        if config.decoder_only:
            self.ae.encoder.requires_grad_(False)
            self.ae.quant_conv.requires_grad_(False)
            params = [*self.ae.post_quant_conv.parameters(), *self.ae.decoder.parameters()]
        self.optimizers["ae"] = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=0.0)
        self.disc = None
        if config.disc_weight > 0:
            self.disc = seeded(PatchDiscriminator, config.disc_channels, config.init_seed + 1).to(self.device)
            self.modules["disc"] = self.disc
            self.optimizers["disc"] = torch.optim.AdamW(self.disc.parameters(), lr=config.lr,
                                                        betas=tuple(config.betas), weight_decay=0.0)

    def info(self) -> dict:
        return {"config": self.config.to_dict(), "scenes": scene_config_to_dict(self.scenes)}

    def restore_info(self, doc: dict) -> None:
        saved = AutoencoderTrainConfig.from_dict(doc["config"])
        if saved != self.config or scene_config_from_dict(doc["scenes"]) != self.scenes:
            raise ValueError(f"{self.folder}: the saved run used another config; resume with the same settings "
                             "or start in a new folder")

    def losses(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        with torch.set_grad_enabled(not self.config.decoder_only):
            posterior = self.ae.encode(x)
        rec = self.ae.decode(posterior.sample(self.generator))
        l1 = (x - rec).abs().mean()
        mse = (x - rec).square().mean()
        s = ssim(x, rec, self.config.ssim_window)
        kl = kl_divergence(posterior.mean, posterior.logvar).mean() / x[0].numel()
        loss = l1 + self.config.mse_weight * mse + self.config.ssim_weight * (1 - s) + self.config.kl_weight * kl
        parts = {"l1": l1.item(), "mse": mse.item(), "ssim": s.item(), "kl": kl.item()}
        if self.disc is not None and step >= self.config.disc_start:
            self.disc.requires_grad_(False)
            adv = -self.disc(rec).mean()
            self.disc.requires_grad_(True)
            loss = loss + self.config.disc_weight * adv
            parts["g_adv"] = adv.item()
        return loss, parts, rec

    def train_step(self, step: int) -> dict[str, float]:
        x = scene_batch(self.config.data_seed, step, self.config.batch_size, self.scenes).images.to(self.device)
        loss, parts, rec = self.losses(x, step)
        opt = self.optimizers["ae"]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, self.config.lr, self.config.lr_final, self.config.lr_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if self.disc is not None and step >= self.config.disc_start:
            d_loss = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean()
            self.optimizers["disc"].zero_grad(set_to_none=True)
            d_loss.backward()
            self.optimizers["disc"].step()
            parts["d_loss"] = d_loss.item()
        return {"loss": loss.item(), **parts}

    @torch.no_grad()
    def heldout_psnr(self, count: int = 32) -> float:
        """PSNR (dB, images in 0..1) of mode reconstructions of held-out scenes."""
        x = heldout_batch(self.config.data_seed, count, self.scenes).images.to(self.device)
        rec = self.ae.eval().decode(self.ae.encode(x).mode())
        return psnr((x + 1) / 2, ((rec + 1) / 2).clamp(0, 1))

    @torch.no_grad()
    def write_samples(self, path: Path) -> None:
        x = heldout_batch(self.config.data_seed, 8, self.scenes).images
        rec = self.ae.eval().decode(self.ae.encode(x.to(self.device)).mode()).cpu()
        image_grid([x, rec]).save(path)
