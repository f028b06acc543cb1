"""The compute comparisons: UNet forward, VAE decode, text encode, ours and reference on one set of weights."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ldm_core.checkpoints.weights_file import read_weights
from ldm_core.loading.loader import load_checkpoint
from ldm_core.loading.model import Checkpoint
from ldm_core.networks.config import ModelConfig

from . import reference
from .table import Row
from .timing import interleaved, progress

PROMPT = "a photo of a cat"
TIMESTEP = 500.0
SEED = 0

Tensors = Mapping[str, torch.Tensor]


def agreement(ours: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (ours.float() - ref.float()).abs().max().item()
    return f"max abs diff {diff:.2g} (max abs ref {ref.abs().max().item():.3g})"


def _timed_pair(ours: Callable[[], torch.Tensor], ref: Callable[[], torch.Tensor], repeats: int,
                label: str) -> tuple[dict[str, float], str]:
    """Median seconds of both, and how far apart their last outputs are."""
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        medians = interleaved(
            {"ours": lambda: out.__setitem__("ours", ours()), "reference": lambda: out.__setitem__("reference", ref())},
            repeats, label=label,
        )
    return medians, agreement(out["ours"], out["reference"])


def unet_case(ckpt: Checkpoint, config: ModelConfig, tensors: Tensors, repeats: int, size: int) -> list[Row]:
    """One CFG step's forward: x [2, 4, size, size], t [2], context [2, 77, D]."""
    ref = reference.build_unet(config, tensors)
    torch.manual_seed(SEED)
    x = torch.randn(2, config.unet.in_channels, size, size)
    t = torch.full((2,), TIMESTEP)
    context = torch.randn(2, 77, config.unet.context_dim)
    medians, agree = _timed_pair(lambda: ckpt.model.unet(x, t, context),
                                 lambda: ref(x, t, encoder_hidden_states=context).sample, repeats, "unet")
    return [Row(f"UNet forward 2×4×{size}×{size} fp32 (vs diffusers UNet2DConditionModel)",
                medians["ours"], medians["reference"], 0.9, agree)]


def vae_case(ckpt: Checkpoint, config: ModelConfig, tensors: Tensors, repeats: int, size: int) -> list[Row]:
    """Decode z [1, 4, size, size] to [1, 3, f·size, f·size]."""
    assert ckpt.vae is not None, "the benchmark checkpoint carries a VAE"
    ref = reference.build_vae(config, tensors)
    torch.manual_seed(SEED)
    z = torch.randn(1, config.vae.z_channels, size, size)
    medians, agree = _timed_pair(lambda: ckpt.vae.model.decode(z), lambda: ref.decode(z).sample, repeats, "vae")
    pixels = size * config.vae.downsample_factor
    return [Row(f"VAE decode 1×4×{size}×{size} → {pixels}² fp32 (vs diffusers AutoencoderKL)",
                medians["ours"], medians["reference"], 1.0, agree)]


def text_case(ckpt: Checkpoint, config: ModelConfig, tensors: Tensors, repeats: int,
              tokenizer_dir: Path) -> list[Row]:
    """Prompt → context [1, 77, 768]: tokenizing included on both sides; then the forward alone."""
    assert ckpt.text_encoder is not None, "the benchmark checkpoint carries a text encoder"
    ref = reference.build_text_model(config, tensors)
    tokenizer = reference.load_tokenizer(tokenizer_dir)

    def ref_encode() -> torch.Tensor:
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return ref(ids).last_hidden_state

    medians, agree = _timed_pair(lambda: ckpt.text_encoder.encode(PROMPT).context, ref_encode, repeats, "text")
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoder = text_encoders(ckpt)[0]
    fwd, fwd_agree = _timed_pair(lambda: encoder(ids)[0], lambda: ref(ids).last_hidden_state, repeats, "text fwd")
    return [
        Row(f"text encode {PROMPT!r} (tokenize + CLIP-L; vs transformers CLIPTokenizer + CLIPTextModel)",
            medians["ours"], medians["reference"], 1.0, agree, gate=False),
        Row("text: CLIP-L forward only, same ids", fwd["ours"], fwd["reference"], 1.0, fwd_agree, gate=False),
    ]


def text_encoders(ckpt: Checkpoint) -> list[torch.nn.Module]:
    """The CLIP towers of a checkpoint (a TextEncoderSet or, in older ldm_core, a plain list)."""
    if ckpt.text_encoder is None:
        return []
    encoders = ckpt.text_encoder.encoders
    return list(encoders.encoders.values()) if hasattr(encoders, "encoders") else list(encoders)


def run(path: Path, config: ModelConfig, which: list[str], repeats: dict[str, int], tokenizer_dir: Path,
        latent_size: int = 64) -> list[Row]:
    """The selected compute cases, each on its own reference model (freed before the next is built).

    Models are loaded outside inference mode (only the timed calls run in it): weights
    made under inference mode are inference tensors, which some in-place caches refuse.
    """
    progress(f"loading {path.name} (ours) and reading it for the references")
    ckpt = load_checkpoint(path, device="cpu")
    tensors = read_weights(path).tensors
    rows: list[Row] = []
    for name in which:
        progress(f"case {name}: building the reference")
        if name == "unet":
            rows += unet_case(ckpt, config, tensors, repeats[name], latent_size)
        elif name == "vae":
            rows += vae_case(ckpt, config, tensors, repeats[name], latent_size)
        elif name == "text":
            rows += text_case(ckpt, config, tensors, repeats[name], tokenizer_dir)
    return rows
