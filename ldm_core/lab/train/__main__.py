"""`python -m ldm_core.lab.train` (the `ldm-train` script): train, estimate and export the embedded model.

    ldm-train stage1 --run runs/scenes --steps 2500     # autoencoder  → runs/scenes/stage1
    ldm-train refine --run runs/scenes --steps 1000     # decoder only, frozen encoder → runs/scenes/stage1_refine
    ldm-train stage2 --run runs/scenes --steps 4800     # diffusion    → runs/scenes/stage2
    ldm-train polish --run runs/scenes --steps 1000     # stage 2 on, fresh short schedule → runs/scenes/stage2_polish
    ldm-train export --run runs/scenes --to models/scenes.safetensors
    ldm-train all --run runs/scenes                       # all of the above with the shipped step counts
    ldm-train estimate                                    # seconds per step of each stage here

Every command resumes where the run folder left off; --steps is the total to reach.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _batch(config, args: argparse.Namespace):
    """The stage's config with --batch-size applied when given (else the config's own default)."""
    return config.replace(batch_size=args.batch_size) if args.batch_size else config


def _device(args: argparse.Namespace):
    """--device as a torch device (cpu by default: the recipe's timings are a CPU's), or a clear exit."""
    from ldm_core.device import DeviceError, pick_device

    try:
        return pick_device(args.device)
    except DeviceError as e:
        raise SystemExit(f"ldm-train {args.command}: {e}") from None


def _stage1(args: argparse.Namespace):
    from ldm_core.lab.train.autoencoder_stage import STAGE1, AutoencoderStage, AutoencoderTrainConfig

    config = _batch(AutoencoderTrainConfig(data_seed=args.seed, init_seed=args.seed, **STAGE1), args)
    return AutoencoderStage(Path(args.run) / "stage1", config, device=_device(args))


def _refine(args: argparse.Namespace):
    from ldm_core.lab.train.autoencoder_stage import REFINE, AutoencoderStage, AutoencoderTrainConfig
    from ldm_core.lab.train.diffusion_stage import load_stage1

    ae, vae_config = load_stage1(Path(args.run) / "stage1")
    config = _batch(AutoencoderTrainConfig(vae=vae_config, data_seed=args.seed + 2, init_seed=args.seed + 2, **REFINE), args)
    return AutoencoderStage(Path(args.run) / "stage1_refine", config, init=ae, device=_device(args))


def _diffusion(args: argparse.Namespace, name: str, folder: str, config, after: str, first: str,
               init: str | None = None):
    """Stage `name`, a diffusion run in run/folder on the refined autoencoder as it ships, once run/after
    holds a saved run (else a clear exit saying to `first`); `init`: the run folder it continues."""
    from ldm_core.lab.train.diffusion_stage import STAGE2_SCENES, DiffusionStage, as_shipped, load_stage1
    from ldm_core.lab.train.state import has_state

    run = Path(args.run)
    if not has_state(run / after):
        raise SystemExit(f"ldm-train {name}: no saved run in {run / after}; {first} "
                         f"(ldm-train all --run {args.run} runs every stage in order)")
    ae, _ = load_stage1(run / "stage1_refine")  # the encoder is stage 1's: refine trains the decoder only
    return DiffusionStage(run / folder, as_shipped(ae), _batch(config, args), STAGE2_SCENES,
                          init=run / init if init else None, device=_device(args))


def _stage2(args: argparse.Namespace):
    from ldm_core.lab.train.diffusion_stage import stage2_config

    return _diffusion(args, "stage2", "stage2", stage2_config(args.seed + 1), after="stage1_refine",
                      first="train the autoencoder and refine its decoder first")


def _polish(args: argparse.Namespace):
    from ldm_core.lab.train.diffusion_stage import polish_config

    return _diffusion(args, "polish", POLISH_FOLDER, polish_config(args.seed + 3), after="stage2",
                      first="train stage 2 first", init="stage2")


def _train(make, args: argparse.Namespace) -> int:
    stage = make(args)
    if stage.resume():
        print(f"resuming {stage.name} at step {stage.step}", file=sys.stderr)
    stage.run(args.steps, log_every=args.log_every, save_every=args.save_every, sample_every=args.sample_every)
    if stage.name == "autoencoder":
        print(json.dumps({"heldout_psnr_db": round(stage.heldout_psnr(), 2)}))
    return 0


# Training commands in the order `ldm-train all` runs them.
STAGES = {"stage1": _stage1, "refine": _refine, "stage2": _stage2, "polish": _polish}
POLISH_FOLDER = "stage2_polish"

# The step counts of the shipped ldm_core/data/ldm-scenes.safetensors (`ldm-train all`).
SHIPPED_STEPS = {"stage1": 2500, "refine": 1000, "stage2": 4800, "polish": 1000}


def _all(args: argparse.Namespace) -> int:
    """Every stage to the shipped step count, then the export (each stage resumes if interrupted)."""
    from ldm_core.checkpoints import embedded

    args.to = args.to or str(embedded.EMBEDDED_PATH)
    for name, make in STAGES.items():
        args.steps = SHIPPED_STEPS[name]
        _train(make, args)
    return _export(args)


def _estimate(args: argparse.Namespace) -> int:
    """Time a few steps of the autoencoder and of stage 2 with the shipped configs (after one warm-up step)."""
    import torch

    from ldm_core.lab.train.autoencoder_stage import (
        SCENES_VAE,
        STAGE1,
        AutoencoderStage,
        AutoencoderTrainConfig,
        build_autoencoder,
    )
    from ldm_core.lab.train.diffusion_stage import STAGE2_SCENES, DiffusionStage, stage2_config

    with tempfile.TemporaryDirectory() as tmp:
        s1 = AutoencoderStage(Path(tmp) / "s1", AutoencoderTrainConfig(**STAGE1))
        s2 = DiffusionStage(Path(tmp) / "s2", build_autoencoder(SCENES_VAE, 0), stage2_config(1),
                            STAGE2_SCENES)
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


def _export(args: argparse.Namespace) -> int:
    """The run's checkpoint: stage 2 (polished, if it was) with the refined autoencoder (stage 1's, if not refined)."""
    import torch

    from ldm_core.lab.train.export import export_checkpoint
    from ldm_core.lab.train.state import has_state

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    run = Path(args.run)
    stage1 = run / "stage1_refine" if has_state(run / "stage1_refine") else run / "stage1"
    diffusion = run / POLISH_FOLDER if has_state(run / POLISH_FOLDER) else run / "stage2"
    print(f"autoencoder from {stage1}, diffusion from {diffusion}", file=sys.stderr)
    path = export_checkpoint(stage1, diffusion, args.to, dtype=dtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"stage1": "train the autoencoder", "refine": "train the autoencoder's decoder further on its frozen encoder",
             "stage2": "train the diffusion model (UNet, text and box-layout encoders) on the refined autoencoder",
             "polish": "train stage 2 on from its weights with a fresh, short, lower-rate schedule"}

    def run_args(p: argparse.ArgumentParser, save_every: int, sample_every: int) -> None:
        p.add_argument("--run", required=True, help="run folder (stage1/, stage1_refine/, stage2/, stage2_polish/ live inside)")
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
    p = sub.add_parser("all", help="train every stage to the shipped step counts, then export")
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
