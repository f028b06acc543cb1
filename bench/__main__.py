"""Command line: `python -m bench [--quick] [--only unet,vae,text,load] [--repeats N] [--out FILE]`.

Prints a markdown table (stdout) of ours vs reference medians with ratios, targets and
verdicts; progress goes to stderr. The checkpoint is generated once into the cache dir.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

CASES = ("unet", "vae", "text", "load")
# Timed runs per case after one warm-up: (full size, --quick).
REPEATS = {"unet": (3, 2), "vae": (2, 1), "text": (10, 3), "load": (2, 1)}
# Latent side: 64 is 512² images; --quick uses 16 (128²), as attention over 64² tokens
# costs seconds even at narrow width.
LATENT_SIZE = (64, 16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time ldm_core against diffusers / transformers on the same random SD1.5 weights (CPU, fp32).",
    )
    p.add_argument("--quick", action="store_true", help="narrow weights (same layout): a smoke run in seconds")
    p.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--repeats", type=int,
                   help="timed runs per case (default: 3 UNet, 2 VAE, 10 text, 2 load; fewer with --quick)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/ldm-bench"), help="where the checkpoint is kept")
    args = p.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    if unknown := [c for c in args.only if c not in CASES]:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()  # before the imports below pull in diffusers' pipelines
    from . import cases, load_times, reference, system, table, weights

    size_index = 1 if args.quick else 0
    which = [c for c in CASES if c in args.only]
    repeats = {c: args.repeats or REPEATS[c][size_index] for c in CASES}
    config = weights.bench_config(args.quick)
    path = weights.ensure_checkpoint(args.cache_dir, args.quick)
    pipeline_dir = reference.write_pipeline_folder(config, args.cache_dir / f"diffusers-{path.stem}")

    rows: list[table.Row] = []
    compute = [c for c in which if c != "load"]
    if compute:
        rows += cases.run(path, config, compute, repeats, pipeline_dir / "tokenizer", LATENT_SIZE[size_index])
    gc.collect()  # the compute cases' mappings of the file must be gone before cold loads
    if "load" in which:
        # --quick evicts only its small file, not every other user's page cache
        rows += load_times.run(path, pipeline_dir, repeats["load"], whole_cache=not args.quick)

    size = path.stat().st_size / 2**30
    lines = [
        f"# ldm_core benchmark{' (--quick: narrow weights)' if args.quick else ''}",
        "",
        *[f"- {h}" for h in system.header()],
        f"- checkpoint: {path} ({size:.2f} GiB, random SD1.5-layout weights, fp32); CPU, fp32, inference mode",
        f"- medians of {', '.join(f'{c} {repeats[c]}' for c in which)} interleaved runs after one warm-up",
        "",
        table.render(rows),
    ]
    table.emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
