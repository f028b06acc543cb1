"""The trained model as one single-file checkpoint in Stable Diffusion's key layout.

Keys: `model.diffusion_model.*` (EMA UNet), `first_stage_model.*` (autoencoder),
`cond_stage_model.transformer.*` (EMA text encoder, transformers CLIP names),
`layout_stage_model.*` (EMA box-layout encoder, when the model has one), and the
whole `ModelConfig` as JSON in the safetensors metadata key `ldm_core.config`, so
`ldm_core.loader.load_checkpoint` builds it through its normal path with no preset.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_core.checkpoints.model_family import CONFIG_METADATA_KEY, text_prefixes
from ldm_core.checkpoints.weights_file import LAYOUT_PREFIX, VAE_PREFIX
from ldm_core.lab.train.diffusion_stage import DiffusionTrainConfig
from ldm_core.lab.train.state import read_state, sub_state
from ldm_core.networks.config import ModelConfig, VAEConfig


def checkpoint_tensors(config: ModelConfig, unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor],
                       text: dict[str, torch.Tensor], layout: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    (prefix,) = text_prefixes(config)
    out = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    out.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    out.update({f"{prefix}{k}": v for k, v in text.items()})
    out.update({f"{LAYOUT_PREFIX}{k}": v for k, v in (layout or {}).items()})
    return out


def export_checkpoint(stage1: str | Path, stage2: str | Path, path: str | Path, *,
                      dtype: torch.dtype = torch.float16, vae_dtype: torch.dtype | None = None,
                      extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the single-file checkpoint of a finished run (stage-1 and stage-2 run folders).

    `stage1` may instead be an exported checkpoint file whose autoencoder is taken as it is
    (the `ground` stage trains on the base model's frozen autoencoder).

    `dtype` for the UNet and text encoder (EMA weights), `vae_dtype` for the autoencoder
    (default: `dtype`). Returns the path written.
    """
    if Path(stage1).is_file():
        from ldm_core.lab.train.diffusion_stage import read_checkpoint

        base, tensors, metadata = read_checkpoint(stage1)
        t1 = {f"model.ae.{k}": v for k, v in sub_state(tensors, VAE_PREFIX).items()}
        doc1 = {"stage": "autoencoder", "config": {"vae": base.vae.to_dict()},
                "step": json.loads(metadata.get("ldm_core.train_steps", "{}")).get("autoencoder", 0)}
    else:
        t1, doc1 = read_state(Path(stage1))
    t2, doc2 = read_state(Path(stage2))
    if doc1.get("stage") != "autoencoder" or doc2.get("stage") != "diffusion":
        raise ValueError(f"export needs a stage-1 (autoencoder) folder and a stage-2 (diffusion) folder; got "
                         f"{doc1.get('stage')!r} and {doc2.get('stage')!r}")
    if doc2.get("latent_scale") is None:
        raise ValueError(f"{stage2}: the diffusion run has not trained a step yet; nothing to export")
    train = DiffusionTrainConfig.from_dict(doc2["config"])
    config = ModelConfig(family="scenes", unet=train.unet, vae=VAEConfig.from_dict(doc1["config"]["vae"]),
                         text_encoders=(train.text,), prediction=train.prediction, latent_scale=float(doc2["latent_scale"]),
                         schedule=train.schedule, layout=train.layout, coord_channels=train.coord_channels)
    vae_dtype = vae_dtype or dtype

    def cast(sd: dict[str, torch.Tensor], dt: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}

    tensors = checkpoint_tensors(config, cast(sub_state(t2, "ema.unet."), dtype), cast(sub_state(t1, "model.ae."), vae_dtype),
                                 cast(sub_state(t2, "ema.text."), dtype),
                                 cast(sub_state(t2, "ema.layout."), dtype) if train.layout is not None else None)
    meta = {CONFIG_METADATA_KEY: json.dumps(config.to_dict()), "ldm_core.train_steps": json.dumps(
        {"autoencoder": doc1["step"], "diffusion": doc2["step"] + doc2.get("init_steps", 0)}), **(extra_metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
