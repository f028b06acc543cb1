"""The loaded parts of a latent diffusion model, each with the few operations it offers.

`DiffusionModel` (UNet + noise schedule + prediction type + latent format),
`TextEncoder` (tokenizer + one or two CLIP text transformers, clip skip, textual
inversion), `VAE` (pixels ↔ raw latents). Loading lives in `loader.py`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ldm_core.conditioning.cond import Cond
from ldm_core.device import free_memory
from ldm_core.errors import PromptError
from ldm_core.imaging import latent as latents
from ldm_core.lora.weight_patch import LoraTarget, PatchedModule, WeightPatch, patched
from ldm_core.networks.autoencoder_kl import AutoencoderKL
from ldm_core.networks.clip_text import FROM_CONFIG, TextEncoderSet
from ldm_core.networks.config import ModelConfig, TextEncoderConfig, VAEConfig
from ldm_core.networks.unet import UNetModel
from ldm_core.networks.weight_cast import computing_in
from ldm_core.sampling.denoiser import Denoiser
from ldm_core.sampling.schedule import DiscreteSchedule
from ldm_core.text.prompt_syntax import tokenize_with_weights
from ldm_core.text.tokenizer import ClipTokenizer
from ldm_core.tiling.tiled_vae import TileOptions, decode_tiled, encode_tiled, untiled_bytes

log = logging.getLogger(__name__)


@dataclass
class DiffusionModel:
    """ε_θ(z_t, t, τ_θ(y)) with what a sampler needs to use it."""

    unet: UNetModel
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    schedule: DiscreteSchedule = field(init=False)
    # LoRA weight patches carried by this view of the (shared, unchanged) UNet; see lora/weight_patch.py.
    patches: tuple[WeightPatch, ...] = ()
    # x̂0 (model space) → RGB uint8 [h, w, 3] for per-step previews (imaging/preview.py); the loader
    # binds it to the checkpoint's VAE, None shows no previews.
    preview: Callable[[torch.Tensor], Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.schedule = DiscreteSchedule(self.config.schedule)

    @property
    def latent_channels(self) -> int:
        return self.config.unet.out_channels

    @property
    def pixels_per_cell(self) -> int:
        """Image pixels per latent cell along each side: the VAE's downsampling factor f."""
        return self.config.vae.downsample_factor

    def image_size(self, latent_shape: Sequence[int]) -> tuple[int, int]:
        """(H, W) in pixels of the image a latent [..., h, w] decodes to."""
        f = self.pixels_per_cell
        return latents.pixels(latent_shape[-2], f), latents.pixels(latent_shape[-1], f)

    def latent_cells(self, pixels: int) -> int:
        """Latent cells covering `pixels` image pixels (floored)."""
        return latents.cells(pixels, self.pixels_per_cell)

    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent → the scaled space the model was trained in (×0.18215 for SD)."""
        return latent * self.config.latent_scale

    def latent_out(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.config.latent_scale

    def denoiser(self) -> Denoiser:
        """D(x, σ). With patches, the UNet it calls merges them once (at its first call) and
        swaps them in around each forward, so the shared UNet is never left patched."""
        unet = PatchedModule(self.unet, self.patches) if self.patches else self.unet
        return Denoiser(unet, self.schedule, self.config.prediction, self.dtype, self.config.coord_channels)

    def with_patches(self, patches: list[WeightPatch] | tuple[WeightPatch, ...]) -> "DiffusionModel":
        """A view of the same UNet with `patches` added after this view's own (LoRAs stack)."""
        return replace(self, patches=self.patches + tuple(patches))

    def lora_target(self) -> LoraTarget:
        """What a LoRA file can name in this UNet: every spelling of every weight, and the shapes."""
        from ldm_core.lora.lora_names import unet_key_map

        sd = self.unet.state_dict()
        return LoraTarget("unet", unet_key_map(sd, self.config.unet), {k: v.shape for k, v in sd.items()})

    def weights_applied(self):  # -> context manager yielding the UNet
        """`with model.weights_applied() as unet:` the shared UNet with this view's patches merged
        in for the block (restored after), for code that calls the UNet directly."""
        return patched(self.unet, self.patches)


EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")


def _load_embedding(path: Path, width: int, key: str) -> torch.Tensor | None:
    from ldm_core.checkpoints.weights_file import read_weights  # local: avoids a cycle through loader

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
    # LoRA weight patches carried by this view of the (shared, unchanged) encoders; see lora/weight_patch.py.
    patches: tuple[WeightPatch, ...] = ()

    @property
    def configs(self) -> list[TextEncoderConfig]:
        return [e.config for e in self.encoders.encoders.values()]

    def with_patches(self, patches: list[WeightPatch] | tuple[WeightPatch, ...]) -> "TextEncoder":
        """A view of the same encoders with `patches` added after this view's own (LoRAs stack)."""
        return replace(self, patches=self.patches + tuple(patches))

    def lora_target(self) -> LoraTarget:
        """What a LoRA file can name in these encoders (keys `encoders.<name>.text_model...`)."""
        from ldm_core.lora.lora_names import text_key_map

        sd = self.encoders.state_dict()
        names = list(self.encoders.encoders)
        return LoraTarget("text", text_key_map(sd, names), {k: v.shape for k, v in sd.items()})

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
        with patched(self.encoders, self.patches):  # LoRA merged for this call only
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

    def _pixels_in(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE [B,H,W,3] in 0..1 → [B,3,H',W'] in −1..1 (H', W' cropped to multiples of f) on the device."""
        return self.crop_to_factor(image).movedim(-1, 1).to(self.device, self.dtype) * 2 - 1

    @staticmethod
    def _pixels_out(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()

    def _fits(self, height: int, width: int, what: str) -> bool:
        """False (with a message) when the untiled pass would clearly not fit in free memory."""
        need, free = untiled_bytes(self.model, height, width), free_memory(self.device)
        if need <= free:
            return True
        log.warning("VAE %s at %d×%d needs about %.1f GiB, %.1f GiB are free: running it tiled (exact)",
                    what, width, height, need / 2**30, free / 2**30)
        return False

    @torch.inference_mode()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior mean (or a sample, given a generator) of E(2·image − 1).

        Runs tiled (exact) instead when the plain pass would not fit or runs out of memory.
        """
        x = self._pixels_in(image)
        posterior = None
        if self._fits(x.shape[-2], x.shape[-1], "encode"):
            try:
                posterior = self.model.encode(x)
            except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
                if not _out_of_memory(e):
                    raise
                log.warning("VAE encode of %s ran out of memory; retrying tiled (exact, same result)", list(x.shape))
        if posterior is None:
            posterior = encode_tiled(self.model, x, TileOptions())
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return z.float().cpu()

    @torch.inference_mode()
    def encode_tiled(self, image: torch.Tensor, tile: int | None = None, mode: str = "exact",
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """`encode` in tiles of `tile` image px (None: from free memory); "exact" equals `encode`."""
        posterior = encode_tiled(self.model, self._pixels_in(image), TileOptions(tile, mode))
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return z.float().cpu()

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """D(latent) as an IMAGE [B,H,W,3] float32 in 0..1 on the CPU.

        Runs tiled (exact) instead when the plain pass would not fit or runs out of memory.
        """
        f = self.factor
        if self._fits(f * latent.shape[-2], f * latent.shape[-1], "decode"):
            try:
                return self._pixels_out(self._finite(latent, self.model.decode))
            except RuntimeError as e:
                if not _out_of_memory(e):
                    raise
                log.warning("VAE decode of %s ran out of memory; retrying tiled (exact, same result)",
                            list(latent.shape))
        return self._pixels_out(self._finite(latent, lambda t: decode_tiled(self.model, t, TileOptions())))

    @torch.inference_mode()
    def decode_tiled(self, latent: torch.Tensor, tile: int | None = None, mode: str = "exact") -> torch.Tensor:
        """`decode` in tiles of `tile` image px (None: from free memory); "exact" equals `decode`."""
        options = TileOptions(tile, mode)  # type: ignore[arg-type]  (checked there)
        return self._pixels_out(self._finite(latent, lambda t: decode_tiled(self.model, t, options)))

    def _finite(self, latent: torch.Tensor, run) -> torch.Tensor:
        """run(latent in the VAE's dtype); a non-finite result is redone in fp32 from the
        original (unrounded) latent."""
        x = run(latent.to(self.device, self.dtype))
        if self.dtype != torch.float32 and not torch.isfinite(x).all():
            # fp16 overflow in the SD decoder gives NaN (black images): redo in fp32.
            log.warning("VAE decode in %s produced non-finite values; retrying in fp32", self.dtype)
            with computing_in(self.model, torch.float32, restore=self.dtype):
                x = run(latent.to(self.device, torch.float32))
        return x


def _out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA/MPS raise torch.OutOfMemoryError, the CPU allocator a RuntimeError."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


@dataclass
class Checkpoint:
    """What a single-file checkpoint holds: the diffusion model, its text encoder(s), its VAE."""

    config: ModelConfig
    model: DiffusionModel
    text_encoder: TextEncoder | None
    vae: VAE | None
    path: Path | None = None
    layout_encoder: Any = None  # layout.LayoutEncoder of a text+layout model (ModelConfig.layout), fp32
