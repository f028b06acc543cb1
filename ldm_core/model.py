"""The loaded parts of a latent diffusion model, each with the few operations it offers.

`DiffusionModel` (UNet + noise schedule + prediction type + latent format),
`TextEncoder` (tokenizer + one or two CLIP text transformers, clip skip, textual
inversion), `VAE` (pixels ↔ raw latents). Loading lives in `loader.py`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .conditioning import Cond
from .config import ModelConfig, TextEncoderConfig, VAEConfig
from .errors import PromptError
from .prompt import tokenize_with_weights
from .sampling import Denoiser
from .schedule import DiscreteSchedule
from .text_encoder import FROM_CONFIG, TextEncoderSet
from .tokenizer import ClipTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

log = logging.getLogger(__name__)


@dataclass
class DiffusionModel:
    """ε_θ(z_t, t, τ_θ(y)) with what a sampler needs to use it."""

    unet: UNetModel
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    schedule: DiscreteSchedule = field(init=False)

    def __post_init__(self) -> None:
        self.schedule = DiscreteSchedule(self.config.schedule)

    @property
    def latent_channels(self) -> int:
        return self.config.unet.out_channels

    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent → the scaled space the model was trained in (×0.18215 for SD)."""
        return latent * self.config.latent_scale

    def latent_out(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.config.latent_scale

    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.schedule, self.config.prediction, self.dtype)


EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")


def _load_embedding(path: Path, width: int, key: str) -> torch.Tensor | None:
    from .checkpoint import read_weights  # local: avoids a cycle through loader

    tensors = read_weights(path).tensors
    if "string_to_param.*" in tensors:
        emb = tensors["string_to_param.*"]
    elif key in tensors:
        emb = tensors[key]
    else:
        candidates = [t for t in tensors.values() if t.ndim in (1, 2) and t.shape[-1] == width]
        if not candidates:
            return None
        emb = candidates[0]
    emb = emb.float().reshape(-1, emb.shape[-1])
    return emb if emb.shape[-1] == width else None


@dataclass
class TextEncoder:
    """τ_θ for text: prompt string → Cond. `layer_idx` overrides every encoder's layer (clip skip)."""

    encoders: TextEncoderSet
    tokenizer: ClipTokenizer
    device: torch.device
    dtype: torch.dtype
    layer_idx: int | None = None
    embedding_dirs: tuple[Path, ...] = ()

    @property
    def configs(self) -> list[TextEncoderConfig]:
        return [e.config for e in self.encoders.encoders.values()]

    def with_clip_skip(self, layer_idx: int | None) -> "TextEncoder":
        """A view of the same weights that reads the hidden state after layer `layer_idx` (-1 last, -2 ...)."""
        if layer_idx is not None and layer_idx >= 0:
            raise PromptError(f"clip skip layer must be negative (-1 = last layer), got {layer_idx}")
        return replace(self, layer_idx=layer_idx)

    def with_embedding_dirs(self, dirs: list[str | os.PathLike]) -> "TextEncoder":
        return replace(self, embedding_dirs=tuple(Path(d) for d in dirs))

    def _embedding_lookup(self, config: TextEncoderConfig):
        dirs = self.embedding_dirs

        def lookup(name: str) -> torch.Tensor | None:
            for d in dirs:
                base = (d / name).resolve()
                if not base.is_relative_to(d.resolve()):  # "embedding:../x" must not escape the folder
                    continue
                for suffix in EMBEDDING_SUFFIXES:
                    p = base.with_name(base.name + suffix)
                    if p.is_file():
                        return _load_embedding(p, config.hidden_size, config.name)
            return None

        return lookup if dirs else None

    @torch.inference_mode()
    def encode(self, prompt: str) -> Cond:
        chunks = {
            name: tokenize_with_weights(prompt, self.tokenizer, pad_token=enc.config.pad_token,
                                        embeddings=self._embedding_lookup(enc.config))
            for name, enc in self.encoders.encoders.items()
        }
        layer = FROM_CONFIG if self.layer_idx is None else self.layer_idx
        context, pooled = self.encoders.encode_token_weights(chunks, layer)
        return Cond(context=context.float().cpu(), pooled=None if pooled is None else pooled.float().cpu())


@dataclass
class VAE:
    """The first stage: images [B,H,W,3] in 0..1 ↔ raw latents [B,C,H/f,W/f]."""

    model: AutoencoderKL
    config: VAEConfig
    device: torch.device
    dtype: torch.dtype

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def crop_to_factor(self, image: torch.Tensor) -> torch.Tensor:
        """Centre-crop H and W down to multiples of f (as ComfyUI's VAEEncode does)."""
        f = self.factor
        for dim in (1, 2):
            size = image.shape[dim]
            keep = size // f * f
            if keep != size:
                image = image.narrow(dim, (size % f) // 2, keep)
        return image

    @torch.inference_mode()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior mean (or a sample, given a generator) of E(2·image − 1)."""
        x = self.crop_to_factor(image).movedim(-1, 1).to(self.device, self.dtype) * 2 - 1
        posterior = self.model.encode(x)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return z.float().cpu()

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """D(latent) as an IMAGE [B,H,W,3] float32 in 0..1 on the CPU."""
        x = self.model.decode(latent.to(self.device, self.dtype))
        if self.dtype != torch.float32 and not torch.isfinite(x).all():
            # fp16 overflow in the SD decoder gives NaN (black images): redo in fp32.
            log.warning("VAE decode in %s produced non-finite values; retrying in fp32", self.dtype)
            x = self.model.float().decode(latent.to(self.device, torch.float32))
            self.model.to(self.dtype)
        return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


@dataclass
class Checkpoint:
    """What a single-file checkpoint holds: the diffusion model, its text encoder(s), its VAE."""

    config: ModelConfig
    model: DiffusionModel
    text_encoder: TextEncoder | None
    vae: VAE | None
    path: Path | None = None
