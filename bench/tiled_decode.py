"""Tiled VAE decode benchmark: `python -m bench.tiled_vae [--quick] [--sizes 1024,2048] [--memory]`.

One set of random SD1.x VAE weights (written once to the cache dir). Each candidate runs
once, in a fresh process, on the same seeded latent, so its peak RSS is its own:

- untiled: our `AutoencoderKL.decode`, the reference for time, memory and max |Δ|;
- diffusers tiled: `AutoencoderKL.enable_tiling()` (blended overlapping tiles, not exact);
- ours exact / ours fast: `ldm_core.tiled_vae.decode_tiled`. exact: the default parking (on
  the CPU "hybrid": about one full-resolution map in memory, the larger ones in a temporary
  file); exact-ram: every whole map in memory; exact-disk: every map in a temporary file, so
  RSS holds only one tile's work.

Peak RSS is VmHWM after the weights are loaded (the high-water mark is reset with
/proc/self/clear_refs), so it is weights + runtime + the decode's own peak; "act." is
that peak minus the RSS just before the decode. `--memory` adds a sweep of image sizes
at a fixed tile (narrow weights) to show how each method's activation peak grows.
Prints a markdown table (stdout); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .table import Row, emit, render
from .timing import progress

SEED = 0
METHODS = ("untiled", "diffusers-tiled", "exact", "exact-ram", "exact-disk", "fast")
PARK = {"exact": None, "exact-ram": "cpu", "exact-disk": "disk", "fast": None}
TIME_TARGET = 1.1  # ours exact / untiled
MEMORY_TARGET = 0.4  # ours exact peak RSS / untiled peak RSS


def _config(quick: bool):
    from ldm_core.networks.presets import PRESETS, shrink

    return shrink(PRESETS["sd1"]) if quick else PRESETS["sd1"]


def ensure_weights(cache_dir: Path, quick: bool) -> Path:
    """Random SD1.x VAE weights in the original key layout, written once."""
    from safetensors.torch import save_file

    from ldm_core.checkpoints.synthetic import random_state_dict
    from ldm_core.networks.autoencoder_kl import AutoencoderKL

    path = cache_dir / f"vae-sd1{'-narrow' if quick else ''}-seed{SEED}.safetensors"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        progress(f"writing {path}")
        sd = random_state_dict(AutoencoderKL, _config(quick).vae, SEED)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(sd, str(partial))
        partial.replace(path)
    return path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(method: str, size: int, weights: Path, out: Path, quick: bool, tile: int | None) -> None:
    """Run one decode; print JSON {seconds, peak, before}; save the image (float32 .pt)."""
    from safetensors.torch import load_file

    from ldm_core.networks.autoencoder_kl import AutoencoderKL
    from ldm_core.tiling.tiled_vae import TileOptions, decode_tiled

    config = _config(quick)
    sd = load_file(str(weights))
    if method == "diffusers-tiled":
        from . import reference

        model = reference.build_vae(config, {f"first_stage_model.{k}": v for k, v in sd.items()})
        model.enable_tiling()
        if quick:  # its default 512 px tiles would leave a 512² image untiled
            model.tile_sample_min_size, model.tile_latent_min_size = 256, 256 // config.vae.downsample_factor
        run = lambda z: model.decode(z).sample  # noqa: E731
    else:
        model = AutoencoderKL.from_state_dict(config.vae, sd)
        options = TileOptions(tile, "fast" if method == "fast" else "exact", PARK.get(method))
        run = model.decode if method == "untiled" else (lambda z: decode_tiled(model, z, options))  # noqa: E731
    del sd
    f = config.vae.downsample_factor
    z = torch.randn(1, config.vae.z_channels, size // f, size // f, generator=torch.Generator().manual_seed(SEED))
    try:
        Path("/proc/self/clear_refs").write_text("5\n")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status("VmRSS")
    with torch.inference_mode():
        t0 = time.perf_counter()
        image = run(z)
        seconds_ = time.perf_counter() - t0
    peak = _status("VmHWM")
    torch.save(image.float().contiguous(), out)
    print(json.dumps({"seconds": seconds_, "peak": peak, "before": before}))


def measure(method: str, size: int, weights: Path, workdir: Path, quick: bool, tile: int | None) -> dict:
    out = workdir / f"{method}-{size}.pt"
    cmd = [sys.executable, "-m", "bench.tiled_vae", "--child", method, "--size", str(size), "--weights", str(weights),
           "--image-out", str(out)] + (["--quick"] if quick else []) + ([f"--tile={tile}"] if tile else [])
    progress(f"{method} {size}²: running")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        progress(f"{method} {size}² failed:\n{done.stderr[-2000:]}")
        return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["image"] = out
    progress(f"{method} {size}²: {result['seconds']:.1f} s, peak RSS {result['peak'] / 2**30:.2f} GiB")
    return result


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def compare_rows(size: int, results: dict[str, dict]) -> list[Row]:
    base = results.get("untiled", {})
    ref_image = torch.load(base["image"]) if "image" in base else None
    rows = []
    for method in (m for m in METHODS if m in results):
        r = results[method]
        if "failed" in r:
            rows.append(Row(f"{method} {size}²", None, base.get("seconds"), notes=f"failed: {r['failed']}"))
            continue
        notes = [f"peak RSS {gib(r['peak'])} (act. {gib(r['peak'] - r['before'])})"]
        if method != "untiled" and "peak" in base:
            ratio = r["peak"] / base["peak"]
            aim = f"; target ≤ {MEMORY_TARGET}" if method.startswith("exact") else ""
            notes.append(f"memory {ratio:.2f}× untiled{aim}")
        if ref_image is not None and method != "untiled":
            diff = (torch.load(r["image"]) - ref_image).abs().max().item()
            notes.append(f"max abs Δ to untiled {diff:.2g}" + (" (exact)" if diff <= 1e-4 else ""))
        target = TIME_TARGET if method.startswith("exact") else None
        rows.append(Row(f"{method} decode {size}²", r["seconds"], base.get("seconds"), target, "; ".join(notes)))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tiled_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="narrow weights (same layout) at 512²: a smoke run")
    p.add_argument("--sizes", default=None, help="image sides, comma-separated (default 1024; --quick 512)")
    p.add_argument("--tile", type=int, default=None, help="our tile side in px (default: automatic)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset (e.g. exact at 4096², where untiled does not fit)")
    p.add_argument("--memory", action="store_true", help="also sweep sizes at a fixed tile (narrow weights)")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/ldm-bench"))
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--image-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def memory_sweep(cache_dir: Path, workdir: Path) -> list[str]:
    """Activation peak vs image size, narrow weights, tile 256, for untiled, exact (default
    parking), exact-disk (every map in a file: only the low-resolution part run whole still
    grows) and fast."""
    weights = ensure_weights(cache_dir, True)
    sizes = (256, 512, 1024)
    lines = ["", "Activation peak (RSS high-water mark minus RSS before the decode), narrow SD-layout weights, tile 256:",
             "", "| method | " + " | ".join(f"{s}²" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in ("untiled", "exact", "exact-disk", "fast"):
        cells = []
        for s in sizes:
            r = measure(method, s, weights, workdir, True, 256)
            cells.append("failed" if "failed" in r else f"{(r['peak'] - r['before']) / 2**20:.0f} MiB")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.size, args.weights, args.image_out, args.quick, args.tile)
        return 0
    from . import system

    sizes = [int(s) for s in (args.sizes or ("512" if args.quick else "1024")).split(",")]
    weights = ensure_weights(args.cache_dir, args.quick)
    workdir = args.cache_dir / "tiled-vae-out"
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for size in sizes:
        methods = [m for m in METHODS if m in args.methods.split(",")]
        results = {m: measure(m, size, weights, workdir, args.quick, args.tile) for m in methods}
        rows += compare_rows(size, results)
    lines = [
        f"# Tiled VAE decode{' (--quick: narrow weights)' if args.quick else ''}",
        "",
        *[f"- {h}" for h in system.header()],
        f"- random SD1.x VAE weights ({weights.name}), CPU fp32, one run per cell, each in a fresh process; "
        f"our tile: {args.tile or 'automatic'}; ratio = time / untiled time",
        "",
        render(rows),
    ]
    if args.memory:
        lines += memory_sweep(args.cache_dir, workdir)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
