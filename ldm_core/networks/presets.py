"""Named configurations of the supported checkpoint families.

The numbers are those of the released models (their original YAML configs):
SD1.x (CLIP ViT-L/14, context 768), SD2.x (OpenCLIP ViT-H penultimate layer, context
1024, linear proj_in), inpainting variants (9 input channels: latent + mask + masked
image latent), SDXL base (CLIP-L + OpenCLIP bigG, context 2048, ADM 2816) and refiner
(bigG only, context 1280, ADM 2560).

`shrink(config)` keeps a family's exact key layout (every module, every block count)
but narrows the widths, so tests can build real-layout checkpoints that run on a CPU
in milliseconds.
"""
from __future__ import annotations

import math

from ldm_core.networks.config import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig

CLIP_L = TextEncoderConfig(name="clip_l")
CLIP_H = TextEncoderConfig(
    name="clip_h", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
    hidden_act="gelu", projection_dim=1024, key_format="openclip", layer_idx=-2,
    layer_norm_hidden_state=True, pad_token=0,
)
CLIP_L_SDXL = CLIP_L.replace(layer_idx=-2, layer_norm_hidden_state=False)
CLIP_G = TextEncoderConfig(
    name="clip_g", hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
    hidden_act="gelu", projection_dim=1280, key_format="openclip", layer_idx=-2,
    layer_norm_hidden_state=False, pad_token=0,
)

SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)
SDXL_UNET = UNetConfig(
    model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
    context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
    context_dim=1280, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2560,
)

# Size-conditioning scalars of SDXL, each embedded in 256 Fourier features:
# base: original h, w, crop top, left, target h, w; refiner: h, w, crop top, left, aesthetic score.
SDXL_ADM_SCALARS = 6
SDXL_REFINER_ADM_SCALARS = 5
ADM_FOURIER_DIM = 256

PRESETS: dict[str, ModelConfig] = {
    "sd1": ModelConfig(family="sd1", unet=SD1_UNET, text_encoders=(CLIP_L,)),
    "sd1_inpaint": ModelConfig(family="sd1_inpaint", unet=SD1_UNET.replace(in_channels=9), text_encoders=(CLIP_L,)),
    "sd2": ModelConfig(family="sd2", unet=SD2_UNET, text_encoders=(CLIP_H,)),
    "sd2_v": ModelConfig(family="sd2_v", unet=SD2_UNET, text_encoders=(CLIP_H,), prediction="v"),
    "sd2_inpaint": ModelConfig(family="sd2_inpaint", unet=SD2_UNET.replace(in_channels=9), text_encoders=(CLIP_H,)),
    "sdxl": ModelConfig(
        family="sdxl", unet=SDXL_UNET, text_encoders=(CLIP_L_SDXL, CLIP_G), latent_scale=0.13025, adm="sdxl",
    ),
    "sdxl_refiner": ModelConfig(
        family="sdxl_refiner", unet=SDXL_REFINER_UNET, text_encoders=(CLIP_G,), latent_scale=0.13025,
        adm="sdxl_refiner",
    ),
}

DESCRIPTIONS: dict[str, str] = {
    "sd1": "Stable Diffusion 1.x (CLIP ViT-L/14, 4-channel UNet, eps)",
    "sd1_inpaint": "Stable Diffusion 1.x inpainting (9-channel UNet)",
    "sd2": "Stable Diffusion 2.x 512 (OpenCLIP ViT-H, eps)",
    "sd2_v": "Stable Diffusion 2.x 768 (OpenCLIP ViT-H, v-prediction)",
    "sd2_inpaint": "Stable Diffusion 2.x inpainting (9-channel UNet)",
    "sdxl": "SDXL base (CLIP-L + OpenCLIP bigG, size conditioning)",
    "sdxl_refiner": "SDXL refiner (OpenCLIP bigG, aesthetic-score conditioning)",
}


def adm_scalars(config: ModelConfig) -> int:
    return {"sdxl": SDXL_ADM_SCALARS, "sdxl_refiner": SDXL_REFINER_ADM_SCALARS}.get(config.adm, 0)


def _shrink_te(te: TextEncoderConfig, width: int) -> TextEncoderConfig:
    proj = None if te.projection_dim is None else width
    # Head width as detection infers it: 64, or gcd(width, 64) for narrower models.
    heads = width // math.gcd(width, 64)
    return te.replace(hidden_size=width, num_heads=heads, intermediate_size=2 * width, projection_dim=proj)


# The picture side each family was trained at (what a txt2img without a size should make);
# "scenes" is the embedded model's own family.
NATIVE_SIZE = {"sd1": 512, "sd1_inpaint": 512, "sd2": 512, "sd2_v": 768, "sd2_inpaint": 512, "sdxl": 1024,
               "sdxl_refiner": 1024, "scenes": 64}


def native_size(config: ModelConfig) -> int:
    """The side in pixels `config`'s family was trained at (512 for a family not listed)."""
    return NATIVE_SIZE.get(config.family, 512)


def shrink(config: ModelConfig, width: int = 32) -> ModelConfig:
    """Same key layout, narrow widths: for tests and benchmarks of the loading code."""
    # 48 and 80 wide: gcd with 64 is 16, so 3 and 5 heads (multi-head paths stay exercised).
    tes = tuple(_shrink_te(te, 48 + 32 * i) for i, te in enumerate(config.text_encoders))
    context = sum(te.hidden_size for te in tes) if config.unet.context_dim is not None else None
    unet = config.unet.replace(model_channels=width, context_dim=context)
    if unet.num_head_channels != -1:
        unet = unet.replace(num_head_channels=math.gcd(width, 64))
    if unet.adm_in_channels is not None:
        pooled = tes[-1].projection_dim or tes[-1].hidden_size
        unet = unet.replace(adm_in_channels=pooled + adm_scalars(config) * ADM_FOURIER_DIM)
    return config.replace(unet=unet, vae=config.vae.replace(ch=width), text_encoders=tes)


__all__ = ["PRESETS", "DESCRIPTIONS", "shrink", "adm_scalars", "ScheduleConfig"]
