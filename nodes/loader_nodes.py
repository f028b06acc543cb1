"""Loader nodes: checkpoint, VAE, diffusion model (UNet), text encoders."""
from __future__ import annotations

from .context import NodeContext
from .socket_types import Sockets
from .spec_helpers import combo, node, out

LAYOUT_ENCODER = "LDM_LAYOUT_ENCODER"  # τθ of a box-layout LDM (layout.LayoutEncoder)

from ldm_core.device import WEIGHT_DTYPES
from ldm_core.loading import loader

PREDICTIONS = ("auto", "eps", "v")
FAMILIES = ("auto", "sd1", "sd1_inpaint", "sd2", "sd2_v", "sd2_inpaint", "sdxl", "sdxl_refiner")

# ComfyUI core ids → ours: (our id, core display name, core category, core input names in order).
CORE_NODES = {
    "CheckpointLoaderSimple": ("LDMCheckpointLoader", "Load Checkpoint", "loaders", ("ckpt_name",)),
    "VAELoader": ("LDMVAELoader", "Load VAE", "loaders", ("vae_name",)),
}


def _models(kind: str):
    return lambda ctx: ctx.list_models(kind) if ctx is not None else []


def _searched(kind: str):
    return lambda ctx: ctx.models_searched(kind)


def _weight_dtype(ctx: NodeContext, weight_dtype: str) -> str | None:
    """The node's choice, else the run's (`ldm-run --weight-dtype`), else the file's ("auto")."""
    return weight_dtype if weight_dtype != "auto" else getattr(ctx, "weight_dtype", None)


def load_checkpoint(ctx: NodeContext, ckpt_name: str, prediction: str = "auto", weight_dtype: str = "auto"):
    ck = loader.load_checkpoint(ctx.model_path("checkpoints", ckpt_name), device=ctx.device,
                                prediction=None if prediction == "auto" else prediction,
                                weight_dtype=_weight_dtype(ctx, weight_dtype))
    text = ck.text_encoder
    if text is not None:
        text = text.with_embedding_dirs(ctx.model_dirs.get("embeddings", []))
    return ck.model, text, ck.vae


def load_vae(ctx: NodeContext, vae_name: str, weight_dtype: str = "auto"):
    return (loader.load_vae(ctx.model_path("vae", vae_name), device=ctx.device,
                            weight_dtype=_weight_dtype(ctx, weight_dtype)),)


def load_unet(ctx: NodeContext, unet_name: str, family: str = "auto", prediction: str = "auto",
              weight_dtype: str = "auto"):
    return (loader.load_diffusion_model(ctx.model_path("diffusion_models", unet_name), device=ctx.device,
                                        family=None if family == "auto" else family,
                                        prediction=None if prediction == "auto" else prediction,
                                        weight_dtype=_weight_dtype(ctx, weight_dtype)),)


def load_clip(ctx: NodeContext, clip_name: str, clip_name2: str = "none", weight_dtype: str = "auto"):
    names = [clip_name] + ([] if clip_name2 in ("", "none") else [clip_name2])
    te = loader.load_text_encoder([ctx.model_path("text_encoders", n) for n in names], device=ctx.device,
                                  weight_dtype=_weight_dtype(ctx, weight_dtype))
    return (te.with_embedding_dirs(ctx.model_dirs.get("embeddings", [])),)


def load_layout_encoder(ctx: NodeContext, ckpt_name: str):
    encoder = loader.load_layout_encoder(ctx.model_path("checkpoints", ckpt_name), device=ctx.device)
    return (encoder,)


def _storage() -> object:
    return combo("weight_dtype", WEIGHT_DTYPES, "How the weights are kept in memory: auto as in the file (an fp16 "
                 "file stays fp16, each layer computing in fp32 on the CPU), or fp32 / fp16 / bf16. auto also "
                 "follows ldm-run --weight-dtype.", optional=True)


def specs(s: Sockets, core: bool = False) -> list:
    ckpt = [combo("ckpt_name", _models("checkpoints"), "The checkpoint file (models/checkpoints).",
                  choices_source=_searched("checkpoints"))]
    if not core:
        ckpt.append(combo("prediction", PREDICTIONS, "auto: as the file says; eps or v to override (SD2 768-v files).",
                          optional=True))
        ckpt.append(_storage())
    return [
        node("LDMCheckpointLoader", "Load Checkpoint (LDM)", "loaders", load_checkpoint, ckpt,
             [out(s.model, "MODEL", "The diffusion model (UNet, schedule, latent format)."),
              out(s.clip, "CLIP", "The text encoder(s) with the tokenizer."),
              out(s.vae, "VAE", "The autoencoder between pixels and latents.")],
             "Loads a single-file SD1.x/2.x/XL checkpoint; family, prediction type and widths are detected."),
        node("LDMVAELoader", "Load VAE (LDM)", "loaders", load_vae,
             [combo("vae_name", _models("vae"), "A standalone VAE file (models/vae).", choices_source=_searched("vae")),
              _storage()],
             [out(s.vae, "VAE")], "Loads a standalone VAE (or the VAE inside a checkpoint file)."),
        node("LDMUNetLoader", "Load Diffusion Model (LDM)", "loaders", load_unet,
             [combo("unet_name", _models("diffusion_models"), "A UNet-only file (models/diffusion_models)."),
              combo("family", FAMILIES, "auto: guessed from the context width.", optional=True),
              combo("prediction", PREDICTIONS, "Override the prediction type.", optional=True), _storage()],
             [out(s.model, "MODEL")], "Loads a diffusion model file that holds only the UNet."),
        node("LDMCLIPLoader", "Load Text Encoder (LDM)", "loaders", load_clip,
             [combo("clip_name", _models("text_encoders"), "A CLIP text-encoder file (models/text_encoders)."),
              combo("clip_name2", lambda ctx: ["none"] + _models("text_encoders")(ctx),
                    "SDXL: the second encoder (bigG) beside CLIP-L.", optional=True), _storage()],
             [out(s.clip, "CLIP")], "Loads standalone CLIP-L, OpenCLIP ViT-H or bigG text encoders (two for SDXL)."),
        node("LDMLayoutEncoderLoader", "Load Box-Layout Encoder (LDM)", "loaders", load_layout_encoder,
             [combo("ckpt_name", _models("checkpoints"), "A checkpoint with a box-layout encoder (the embedded "
                    "ldm-scenes model, or a layout2img LDM).")],
             [out(LAYOUT_ENCODER, "LAYOUT_ENCODER", "τθ for boxes: feed Box Layout Encode (LDM).")],
             "Loads the box-layout encoder of a layout-to-image checkpoint."),
    ]
