"""The example input pictures the shipped workflows read (`nodes/examples/`), drawn from the
procedural scenes so they are the kind of picture the embedded model knows.

    python -m ldm_core.lab.example_inputs nodes/examples

- `example.png`: scene 0 of stream 2040 at 64×64, one object: a red circle in the top left
  (img2img.json, inpaint.json's outpainting).
- `example_mask.png`: the same picture with its centre 20×20 made transparent, clear of the
  circle; LoadImage's MASK (1 − alpha) is then the square to repaint (inpaint_mask.json).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_core.lab.scenes import SceneConfig, make_scene

SEED = 2040
CENTRE = slice(22, 42)


def example_pictures() -> dict[str, Image.Image]:
    scene = make_scene(SEED, 0, SceneConfig(object_counts=(1,), count_weights=(1.0,)))
    rgb = (scene.image * 255).round().astype(np.uint8)
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[CENTRE, CENTRE] = 0
    return {"example.png": Image.fromarray(rgb, "RGB"),
            "example_mask.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA")}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "nodes/examples")
    folder.mkdir(parents=True, exist_ok=True)
    for name, picture in example_pictures().items():
        picture.save(folder / name)
        print(folder / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
