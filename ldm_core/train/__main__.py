"""`python -m ldm_core.train` (the `ldm-train` script): train, estimate and export the embedded model.

    ldm-train stage1 --run runs/scenes --steps 4000      # autoencoder  → runs/scenes/stage1
    ldm-train stage2 --run runs/scenes --steps 12000     # diffusion    → runs/scenes/stage2
    ldm-train continue --run runs/scenes --steps 3600    # diffusion on from stage2 → runs/scenes/stage2_continue
    ldm-train refine --run runs/scenes --steps 1000      # decoder only, frozen encoder → runs/scenes/stage1_refine
    ldm-train export --run runs/scenes --to runs/scenes/base.safetensors   # the base model
    ldm-train ground --run runs/scenes --steps 2200      # base + the UNet's context map → runs/scenes/ground
    ldm-train place --run runs/scenes --steps 2000       # ground + gated map, box features → runs/scenes/place
    ldm-train sharpen --run runs/scenes --steps 2000     # place on, map scored at 16×16 → runs/scenes/sharpen
    ldm-train export --run runs/scenes --to models/scenes.safetensors
    ldm-train all --run runs/scenes                       # all of the above with the shipped step counts
    ldm-train estimate                                    # seconds per step of each stage here

Every command resumes where the run folder left off; --steps is the total to reach.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tempfile
from pathlib import Path


def _batch(config, args: argparse.Namespace):
    """The stage's config with --batch-size applied when given (else the config's own default)."""
    return config.replace(batch_size=args.batch_size) if args.batch_size else config


def _device(args: argparse.Namespace):
    """--device as a torch device (cpu by default: the recipe's timings are a CPU's), or a clear exit."""
    from ..device import DeviceError, pick_device

    try:
        return pick_device(getattr(args, "device", "cpu"))
    except DeviceError as e:
        raise SystemExit(f"ldm-train {args.command}: {e}") from None


def _stage1(args: argparse.Namespace):
    from .autoencoder import AutoencoderStage, AutoencoderTrainConfig

    config = _batch(AutoencoderTrainConfig(data_seed=args.seed, init_seed=args.seed), args)
    return AutoencoderStage(Path(args.run) / "stage1", config, device=_device(args))


def _refine(args: argparse.Namespace):
    from .autoencoder import REFINE, AutoencoderStage, AutoencoderTrainConfig
    from .diffusion import load_stage1

    ae, vae_config = load_stage1(Path(args.run) / "stage1")
    config = _batch(AutoencoderTrainConfig(vae=vae_config, data_seed=args.seed + 2, init_seed=args.seed + 2, **REFINE), args)
    return AutoencoderStage(Path(args.run) / "stage1_refine", config, init=ae, device=_device(args))


def _stage2(args: argparse.Namespace):
    from .diffusion import DiffusionStage, DiffusionTrainConfig, load_stage1

    ae, _ = load_stage1(Path(args.run) / "stage1")
    config = _batch(DiffusionTrainConfig(data_seed=args.seed + 1, init_seed=args.seed + 1), args)
    return DiffusionStage(Path(args.run) / "stage2", ae, config, device=_device(args))


def _continue(args: argparse.Namespace):
    from .diffusion import CONTINUE, DiffusionStage, DiffusionTrainConfig, load_stage1

    ae, _ = load_stage1(Path(args.run) / "stage1")
    config = _batch(DiffusionTrainConfig(data_seed=args.seed + 3, init_seed=args.seed + 3, **CONTINUE), args)
    return DiffusionStage(Path(args.run) / "stage2_continue", ae, config, init=Path(args.run) / "stage2",
                          device=_device(args))


def _ground(args: argparse.Namespace):
    from .diffusion import GROUND, GROUND_UNET, SCENES_UNET, DiffusionStage, DiffusionTrainConfig, checkpoint_autoencoder

    init = Path(args.init) if getattr(args, "init", None) else Path(args.run) / BASE_FILE
    if not init.is_file():
        raise SystemExit(f"ldm-train ground: no base checkpoint {init}; export the base model first "
                         f"(ldm-train export --run {args.run} --to {init}) or pass --init FILE")
    ae, _ = checkpoint_autoencoder(init)
    config = _batch(DiffusionTrainConfig(unet=SCENES_UNET.replace(**GROUND_UNET), data_seed=args.seed + 4,
                                         init_seed=args.seed + 4, **GROUND), args)
    return DiffusionStage(Path(args.run) / "ground", ae, config, init=init, device=_device(args))


def _ground_base(run: Path) -> Path:
    """The base checkpoint the run's ground stage started from (its autoencoder is the model's)."""
    state = run / "ground" / "state.json"
    started = json.loads(state.read_text()).get("init") if state.is_file() else None
    return Path(started) if started and Path(started).is_file() else run / BASE_FILE


def _placed(args: argparse.Namespace, name: str, after: str, seed: int, settings: dict):
    """A stage with the place stage's architecture (gated map, box features), continuing run folder `after`."""
    from .diffusion import PLACE_LAYOUT, PLACE_UNET, SCENES_LAYOUT, SCENES_UNET, DiffusionStage, DiffusionTrainConfig, \
        checkpoint_autoencoder
    from .state import has_state

    run = Path(args.run)
    if not has_state(run / after):
        raise SystemExit(f"ldm-train {name}: no saved run in {run / after}; run the stages before it first "
                         f"(ldm-train all --run {args.run} runs them in order)")
    ae, _ = checkpoint_autoencoder(_ground_base(run))
    config = _batch(DiffusionTrainConfig(unet=SCENES_UNET.replace(**PLACE_UNET), layout=SCENES_LAYOUT.replace(**PLACE_LAYOUT),
                                         data_seed=args.seed + seed, init_seed=args.seed + seed, **settings), args)
    return DiffusionStage(run / name, ae, config, init=run / after, device=_device(args))


def _place(args: argparse.Namespace):
    from .diffusion import PLACE

    return _placed(args, "place", "ground", 5, PLACE)


def _sharpen(args: argparse.Namespace):
    from .diffusion import SHARPEN

    return _placed(args, "sharpen", "place", 6, SHARPEN)


def _train(make, args: argparse.Namespace) -> int:
    stage = make(args)
    if stage.resume():
        print(f"resuming {stage.name} at step {stage.step}", file=sys.stderr)
    stage.run(args.steps, log_every=args.log_every, save_every=args.save_every, sample_every=args.sample_every)
    if stage.name == "autoencoder":
        print(json.dumps({"heldout_psnr_db": round(stage.heldout_psnr(), 2)}))
    return 0


# Training commands in the order `ldm-train all` runs them.
STAGES = {"stage1": _stage1, "stage2": _stage2, "continue": _continue, "refine": _refine, "ground": _ground,
          "place": _place, "sharpen": _sharpen}

# The step counts of the shipped ldm_core/data/ldm-scenes.safetensors (`ldm-train all`).
# None: to the end of the stage's cosine (its config's lr_steps).
SHIPPED_STEPS = {"stage1": 2500, "stage2": 2800, "continue": None, "refine": 1000, "ground": None, "place": None,
                 "sharpen": None}
# Diffusion run folders, latest first: the export takes the first that holds a saved state.
DIFFUSION_FOLDERS = ("sharpen", "place", "ground", "stage2_continue", "stage2")
# The base model (stages up to refine, exported) that `ground` starts from, inside the run folder.
BASE_FILE = "base.safetensors"


def _all(args: argparse.Namespace) -> int:
    """Every stage to the shipped step count, then the export (each stage resumes if interrupted)."""
    from .. import embedded
    from .diffusion import CONTINUE, GROUND, PLACE, SHARPEN

    final = args.to or str(embedded.EMBEDDED_PATH)
    for name, make in STAGES.items():
        if name == "ground" and not (Path(args.run) / BASE_FILE).is_file():  # ground starts from the base export
            args.to = str(Path(args.run) / BASE_FILE)
            _export(args, base=True)
        args.steps = SHIPPED_STEPS[name] or {"continue": CONTINUE, "ground": GROUND, "place": PLACE,
                                         "sharpen": SHARPEN}[name]["lr_steps"]
        _train(make, args)
    args.to = final
    return _export(args)


def _estimate(args: argparse.Namespace) -> int:
    """Time a few steps of each stage with the proposed configs (after one warm-up step)."""
    import torch

    from .autoencoder import SCENES_VAE, AutoencoderStage, AutoencoderTrainConfig, build_autoencoder
    from .diffusion import DiffusionStage, DiffusionTrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        s1 = AutoencoderStage(Path(tmp) / "s1", AutoencoderTrainConfig())
        s2 = DiffusionStage(Path(tmp) / "s2", build_autoencoder(SCENES_VAE, 0), DiffusionTrainConfig())
        report = {"threads": torch.get_num_threads()}
        for stage in (s1, s2):
            stage.train_step(0)
            start = time.perf_counter()
            for i in range(1, args.steps + 1):
                stage.train_step(i)
            per = (time.perf_counter() - start) / args.steps
            params = sum(p.numel() for m in stage.modules.values() for p in m.parameters())
            report[stage.name] = {"seconds_per_step": round(per, 3), "parameters": params,
                                  "batch_size": stage.config.batch_size}
    print(json.dumps(report, indent=1))
    return 0


def _export(args: argparse.Namespace, base: bool = False) -> int:
    """The run's checkpoint: its latest diffusion stage (`base`: the latest before ground) with the
    matching autoencoder."""
    import torch

    from .export import export_checkpoint

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    from .state import has_state

    run = Path(args.run)
    stage1 = run / "stage1_refine" if has_state(run / "stage1_refine") else run / "stage1"
    folders = DIFFUSION_FOLDERS[DIFFUSION_FOLDERS.index("stage2_continue"):] if base else DIFFUSION_FOLDERS
    stage2 = next((run / f for f in folders if has_state(run / f)), run / "stage2")
    if stage2.name in ("ground", "place", "sharpen"):  # trained on the base model's autoencoder
        stage1 = _ground_base(run)
    print(f"autoencoder from {stage1}, diffusion from {stage2}", file=sys.stderr)
    path = export_checkpoint(stage1, stage2, args.to, dtype=dtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"stage1": "train the autoencoder", "stage2": "train the diffusion model",
             "continue": "train the diffusion model further from stage2 with a fresh schedule (min-SNR loss)",
             "refine": "train the autoencoder's decoder further on its frozen encoder",
             "ground": "add the UNet's context map to the exported base model and train on (positions, layouts)",
             "place": "train the ground run on with the context map's gated pooling and the boxes' Fourier features",
             "sharpen": "train the place run on with more layouts and the map scored at the latent's size"}

    def run_args(p: argparse.ArgumentParser, save_every: int, sample_every: int) -> None:
        p.add_argument("--run", required=True, help="run folder (stage1/, stage2/, stage2_continue/, stage1_refine/ live inside)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--save-every", type=int, default=save_every)
        p.add_argument("--sample-every", type=int, default=sample_every)
        p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto; data and random draws "
                       "stay on the CPU, so only the arithmetic differs between devices")

    for name in STAGES:
        p = sub.add_parser(name, help=helps[name])
        run_args(p, 500, 1000)
        p.add_argument("--steps", type=int, required=True, help="total steps to reach (resumes)")
        if name == "ground":
            p.add_argument("--init", default=None, help=f"the base checkpoint (default: RUN/{BASE_FILE})")
    p = sub.add_parser("all", help="train both stages and refine to the shipped step counts, then export")
    run_args(p, 250, 500)
    p.add_argument("--to", default=None, help="default: the package's embedded model file")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p = sub.add_parser("export", help="write the single-file checkpoint")
    p.add_argument("--run", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p = sub.add_parser("estimate", help="time training steps of both stages on this machine")
    p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command in STAGES:
        return _train(STAGES[args.command], args)
    if args.command == "export":
        return _export(args)
    if args.command == "all":
        return _all(args)
    return _estimate(args)


if __name__ == "__main__":
    raise SystemExit(main())
