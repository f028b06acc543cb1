"""Sample pictures of the embedded model for the README: text-to-image and layout-to-image.

`python -m bench.gallery [--out docs/] [--checkpoint FILE]`

Writes `txt2img.png` (one column per prompt, three seeds down) and `layout.png` (the
boxes drawn as outlines above the pictures made from them alone) at the default
settings (DPM++ 2M Karras, 20 steps, CFG 5), enlarged ×3 with nearest-neighbour so
the 64² pixels stay visible.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm_core.checkpoints.embedded import embedded_checkpoint
from ldm_core.lab.adherence import Settings, eval_scenes, generate, layout_cond
from ldm_core.loading.loader import load_checkpoint

PROMPTS = (
    "a red circle in the top left", "a blue square at the bottom", "a yellow triangle in the center",
    "a green circle on the right", "a red square left of a blue circle", "a yellow circle above a green triangle",
    "a blue triangle in the top right and a red circle in the bottom left",
)
ZOOM = 3


def _grid(images: torch.Tensor, columns: int) -> Image.Image:
    """IMAGE [N, H, W, 3] in 0..1 → one picture, `columns` wide, 2-pixel white gutters."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, img in enumerate((images.clamp(0, 1) * 255).round().byte().numpy()):
        r, c = divmod(i, columns)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    pic = Image.fromarray(canvas)
    return pic.resize((pic.width * ZOOM, pic.height * ZOOM), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gallery", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs")
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.checkpoint or embedded_checkpoint(), device="cpu")
    conds = [ckpt.text_encoder.encode(t) for t in PROMPTS]
    rows = [generate(ckpt, conds, Settings(seed=seed, batch=len(conds))) for seed in (0, 1, 2)]
    _grid(torch.cat(rows), len(PROMPTS)).save(out / "txt2img.png")

    scenes = eval_scenes({1: 2, 2: 3, 3: 2}, seed=31_337)
    pictures = generate(ckpt, [layout_cond(ckpt, s) for s in scenes], Settings(batch=len(scenes)))
    grid_top = []
    for scene in scenes:
        im = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(im)
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(int(255 * c) for c in o.rgb))
        grid_top.append(torch.from_numpy(np.asarray(im, np.float32) / 255))
    boxes = torch.stack(grid_top)
    _grid(torch.cat([boxes, pictures]), len(scenes)).save(out / "layout.png")
    print(f"wrote {out / 'txt2img.png'} and {out / 'layout.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
