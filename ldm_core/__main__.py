"""`python -m ldm_core`: inspect a checkpoint, make a synthetic one, or run text-to-image."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from ldm_core.checkpoints.model_family import detect_config
    from ldm_core.checkpoints.weights_file import read_weights

    wf = read_weights(args.checkpoint)
    cfg = detect_config(wf.tensors, wf.metadata, prediction=args.prediction)
    print(json.dumps({"file": str(args.checkpoint), "tensors": len(wf.tensors), **cfg.to_dict()}, indent=2))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ldm_core.checkpoints.synthetic import save_checkpoint
    from ldm_core.networks.presets import PRESETS, shrink

    cfg = PRESETS[args.family]
    if args.narrow:
        cfg = shrink(cfg)
    from ldm_core.device import parse_dtype

    path = save_checkpoint(cfg, args.out, seed=args.seed, dtype=parse_dtype(args.dtype))
    print(f"wrote {path} ({cfg.family}, random weights)")
    return 0


def _checkpoint_path(name: str) -> Path:
    """A file path, or the name of a checkpoint shipped with the package (the embedded model)."""
    from ldm_core.checkpoints.embedded import builtin_models

    path = Path(name)
    if not path.exists() and name in builtin_models().get("checkpoints", {}):
        return builtin_models()["checkpoints"][name]
    return path


def _txt2img(args: argparse.Namespace) -> int:
    from ldm_core.device import pick_device, pick_precision
    from ldm_core.imaging.image_io import next_free_path, to_pil, write_png_atomic
    from ldm_core.loading.loader import load_checkpoint
    from ldm_core.networks.presets import native_size
    from ldm_core.pipeline.jobs import txt2img
    from ldm_core.progress import BarProgress

    t0 = time.perf_counter()
    device = pick_device(args.device)
    ck = load_checkpoint(_checkpoint_path(args.checkpoint), device=device, precision=pick_precision(device),
                         prediction=args.prediction)
    side = native_size(ck.config)
    width, height = args.width or side, args.height or side
    images = txt2img(ck, args.prompt, args.negative, width=width, height=height, steps=args.steps,
                     cfg=args.cfg, seed=args.seed, batch_size=args.batch_size, clip_skip=args.clip_skip,
                     progress=BarProgress())
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"parameters": json.dumps({k: v for k, v in vars(args).items() if k != "func"}, default=str)}
    for i in range(images.shape[0]):
        path = write_png_atomic(to_pil(images[i]), next_free_path(out_dir, args.prefix), meta)
        print(path)
    print(f"done in {time.perf_counter() - t0:.1f} s on {device}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_core", description=__doc__)
    sub = p.add_subparsers(required=True)
    info = sub.add_parser("info", help="detect a checkpoint's family and print its config")
    info.add_argument("checkpoint")
    info.add_argument("--prediction", choices=["eps", "v"])
    info.set_defaults(func=_info)
    syn = sub.add_parser("synth", help="write a checkpoint with the real key layout and random weights")
    syn.add_argument("family", choices=["sd1", "sd1_inpaint", "sd2", "sd2_v", "sd2_inpaint", "sdxl", "sdxl_refiner"])
    syn.add_argument("out")
    syn.add_argument("--narrow", action="store_true", help="same layout, narrow widths (fast)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                     help="the tensors' dtype in the file (released SD/SDXL files are fp16)")
    syn.set_defaults(func=_synth)
    t2i = sub.add_parser("txt2img", help="prompt → PNG (Euler, normal schedule, CFG)")
    t2i.add_argument("checkpoint", help="a checkpoint file, or the name of the embedded model (ldm-scenes.safetensors)")
    t2i.add_argument("prompt")
    t2i.add_argument("--negative", default="")
    t2i.add_argument("--width", type=int, default=None, help="default: the size the model was trained at")
    t2i.add_argument("--height", type=int, default=None, help="default: the size the model was trained at")
    t2i.add_argument("--steps", type=int, default=20)
    t2i.add_argument("--cfg", type=float, default=7.0)
    t2i.add_argument("--seed", type=int, default=0)
    t2i.add_argument("--batch-size", type=int, default=1)
    t2i.add_argument("--clip-skip", type=int, default=None)
    t2i.add_argument("--prediction", choices=["eps", "v"])
    t2i.add_argument("--device", default=None)
    t2i.add_argument("--output-dir", default="output")
    t2i.add_argument("--prefix", default="ldm")
    t2i.set_defaults(func=_txt2img)
    args = p.parse_args(argv)
    from ldm_core.errors import LdmError

    try:
        return args.func(args)
    except LdmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
