"""Does the prompt decide *where*? A diagnosis of the embedded model's position words (issue 7).

`python -m bench.placement [--checkpoint FILE] [--seeds 4]`

Three measures, each of position words against colour words, which the model does follow:

- text encoder: how far apart its output tokens are for "a red circle in the top left" and
  "... in the bottom right" (largest per-token distance), against "a red" / "a blue circle in
  the top left", with the typical token norm for scale;
- denoiser: mean |Δx̂0| between those two prompts on the same noisy latent, as a share of
  mean |x̂0|, at several σ (the position share should be comparable to the colour share);
- pictures: for each seed, the red object's centroid under the four corner prompts; "same
  place" counts seeds where all four centroids lie within 2 px of each other.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch

from ldm_core.checkpoints.embedded import embedded_checkpoint
from ldm_core.lab.adherence import Settings, generate
from ldm_core.loading.loader import load_checkpoint

CORNERS = ("in the top left", "in the top right", "in the bottom left", "in the bottom right")


def _context(ckpt, prompt: str) -> torch.Tensor:
    return ckpt.text_encoder.encode(prompt).context


@torch.no_grad()
def text_separation(ckpt) -> tuple[float, float, float]:
    """(largest per-token distance for a position change, for a colour change, median token norm)."""
    a = _context(ckpt, f"a red circle {CORNERS[0]}")[0]
    pos = _context(ckpt, f"a red circle {CORNERS[3]}")[0]
    col = _context(ckpt, f"a blue circle {CORNERS[0]}")[0]
    return ((a - pos).norm(dim=-1).max().item(), (a - col).norm(dim=-1).max().item(),
            a.norm(dim=-1).median().item())


@torch.no_grad()
def denoiser_shares(ckpt, sigmas=(80.0, 14.0, 4.0, 1.0), batch: int = 8) -> list[tuple[float, float, float]]:
    """[(σ, position share, colour share)] of mean |Δx̂0| / mean |x̂0| on shared noise."""
    den = ckpt.model.denoiser()
    ref, pos, col = (_context(ckpt, p).expand(batch, -1, -1) for p in (
        f"a red circle {CORNERS[0]}", f"a red circle {CORNERS[3]}", f"a blue circle {CORNERS[0]}"))
    latent, side = ckpt.model.config.unet.out_channels, 64 // ckpt.vae.factor  # the 64² pictures it was trained on
    g = torch.Generator().manual_seed(0)
    rows = []
    for sigma in sigmas:
        x = torch.randn(batch, latent, side, side, generator=g) * sigma
        s = torch.full((batch,), sigma)
        a, b, c = den(x, s, ref), den(x, s, pos), den(x, s, col)
        size = a.abs().mean().item()
        rows.append((sigma, (a - b).abs().mean().item() / size, (a - c).abs().mean().item() / size))
    return rows


def red_centroids(ckpt, seed: int) -> list[tuple[float, float] | None]:
    """Centroid (x, y) in pixels of the red pixels under each corner prompt, one seed."""
    prompts = [ckpt.text_encoder.encode(f"a red circle {p}") for p in CORNERS]
    out = []
    for cond in prompts:
        img = generate(ckpt, [cond], replace(Settings(), seed=seed, batch=1))[0].numpy()
        ys, xs = np.nonzero((img[..., 0] > 0.6) & (img[..., 1] < 0.4) & (img[..., 2] < 0.4))
        out.append((float(xs.mean()), float(ys.mean())) if len(xs) else None)
    return out


def same_place(centroids: list[tuple[float, float] | None], tol: float = 2.0) -> bool:
    """All four prompts found a red object, and every centroid lies within `tol` px of their mean."""
    if any(c is None for c in centroids):
        return False
    pts = np.array(centroids)
    return bool((np.linalg.norm(pts - pts.mean(0), axis=1) <= tol).all())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded model")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint or embedded_checkpoint(), device="cpu")
    d_pos, d_col, norm = text_separation(ckpt)
    lines = ["| measure | position words | colour words | notes |", "|---|---|---|---|",
             f"| text encoder: largest token distance | {d_pos:.2f} | {d_col:.2f} | median token norm {norm:.2f} |"]
    for sigma, p, c in denoiser_shares(ckpt):
        lines.append(f"| denoiser: mean \\|Δx̂0\\| / mean \\|x̂0\\| at σ = {sigma:g} | {p:.3f} | {c:.3f} | 8 shared noises |")
    found = [red_centroids(ckpt, seed) for seed in range(args.seeds)]
    same = sum(same_place(c) for c in found)
    lines.append(f"| pictures: seeds where all four corner prompts put the circle in the same place | "
                 f"{same}/{args.seeds} | — | dpmpp_2m karras 20 steps cfg 5 |")
    print("\n".join(lines))
    for seed, c in enumerate(found):
        print(f"seed {seed}: " + ", ".join("none" if p is None else f"({p[0]:.0f}, {p[1]:.0f})" for p in c),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
