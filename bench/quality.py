"""Quality of the embedded model (issue 7): reconstruction, prompt adherence per sampler and
step count, layout-to-image box IoU, seconds per image — all through the engine.

`python -m bench.quality [--quick] [--checkpoint FILE] [--out FILE]`

Prompts are the captions of held-out evaluation scenes (`ldm_core.quality.EVAL_SEED`);
the detector of `ldm_core.evaluate` scores every picture. Default settings: DPM++ 2M,
Karras, 20 steps, CFG 5. The sampler comparison runs every deterministic sampler at 20
and 30 steps on one prompt set and DDPM at 1000 steps on the same set as the reference:
each must come within 5 points of it. The notes give each difference with its paired standard
error (same prompts, same initial noise), so that a gap of one prompt is read as what it is.
CPU; seconds are wall time on this machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ldm_core.checkpoints.embedded import embedded_checkpoint
from ldm_core.lab.adherence import Settings, adherence, caption_scores, eval_scenes, layout_scores, reconstruction_psnr
from ldm_core.lab.detector import objects_rate
from ldm_core.loading.loader import load_checkpoint

DETERMINISTIC = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc", "uni_pc_bh2", "plms")
# Samplers also measured on the step grid they were published with (the main comparison uses
# Karras for all): PLMS's equal-step Adams–Bashforth weights come from the LDM repository's
# evenly spaced timesteps, which is the `ddim_uniform` scheduler.
OWN_GRID = {"plms": "ddim_uniform"}


def within_points(rate: float, reference: float, points: float = 0.05) -> bool:
    """Whether `rate` is at most `points` below `reference`; exactly `points` below counts as within (rates are
    counts over the same prompts, so 0.84 against 0.89 is 5 of 100 prompts, which float subtraction
    makes 0.0500…04)."""
    return rate - reference >= -points - 1e-9


def paired_difference(scores: list, reference: list) -> tuple[float, float]:
    """Mean and standard error of the per-prompt difference in "objects right" (1 or 0) between
    two runs on the same prompts and the same initial noise. The comparison set holds equally
    many one- and two-object prompts, so the mean is also the difference of the two rates'
    average."""
    d = torch.tensor([float(a.objects_correct) - float(b.objects_correct) for a, b in zip(scores, reference)],
                     dtype=torch.float64)
    return d.mean().item(), (d.std(unbiased=True) / len(d) ** 0.5).item() if len(d) > 1 else float("nan")


def run(args: argparse.Namespace) -> list[tuple]:
    ckpt = load_checkpoint(args.checkpoint or embedded_checkpoint(), device="cpu")
    n = args.prompts or (24 if args.quick else 100)
    n1, n2, n3 = n, n, max(1, n // 3)
    rows: list[tuple] = []  # (measure, value, target, verdict, notes)

    def add(measure: str, value: float, target: str, ok: bool | None, notes: str = "") -> None:
        verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
        rows.append((measure, value, target, verdict, notes))
        print(f"{measure}: {value:.3f} {target} {verdict}", file=sys.stderr, flush=True)

    held = eval_scenes({1: n1 // 2, 2: n1 // 2, 3: n1 // 4}, seed=123_456)
    db = reconstruction_psnr(ckpt, held)
    add("reconstruction PSNR (dB)", db, "≥ 30", db >= 30, f"{len(held)} held-out scenes, VAE as shipped")

    scenes = eval_scenes({1: n1, 2: n2, 3: n3})
    base = Settings()
    start = time.perf_counter()
    r = adherence(ckpt, scenes, base)
    add("objects right, 1-object prompts", r["objects_correct_1"], "≥ 0.90", r["objects_correct_1"] >= 0.9,
        f"{n1} prompts, dpmpp_2m karras 20 steps cfg 5")
    add("objects right, 2-object prompts", r["objects_correct_2"], "≥ 0.75", r["objects_correct_2"] >= 0.75, f"{n2} prompts")
    add("objects right, 3-object prompts", r["objects_correct_3"], "—", None, f"{n3} prompts")
    add("position words and relations honoured", r["spatial_correct"], "≥ 0.75", r["spatial_correct"] >= 0.75,
        "of those the captions state")
    add("seconds per image", r["seconds_per_image"], "—", None, f"batch {base.batch}, {torch.get_num_threads()} threads")

    lay = layout_scores(ckpt, eval_scenes({1: n1 // 2, 2: n2 // 2, 3: n3}, seed=654_321), base)
    add("layout-to-image: objects with box IoU ≥ 0.5", lay["iou_at_least_0.5"], "≥ 0.80",
        lay["iou_at_least_0.5"] >= 0.8, f"{int(lay['objects'])} objects, mean IoU {lay['mean_iou']:.2f}")

    cmp_scenes = eval_scenes({1: n1 // 2, 2: n2 // 2}, seed=424_242)
    ref, _ = caption_scores(ckpt, cmp_scenes, replace(base, sampler="ddpm", scheduler="normal", steps=args.ddpm_steps,
                                                        batch=64))
    ref_rate = objects_rate(ref)
    add(f"DDPM {args.ddpm_steps} steps (reference)", ref_rate, "—", None, f"{len(cmp_scenes)} prompts, objects right")
    runs = [(s, base.scheduler) for s in DETERMINISTIC] + list(OWN_GRID.items())
    for steps in (20, 30):
        for sampler, scheduler in runs:
            settings = replace(base, sampler=sampler, scheduler=scheduler, steps=steps, batch=64)
            scores, seconds = caption_scores(ckpt, cmp_scenes, settings)
            rate = objects_rate(scores)
            diff, se = paired_difference(scores, ref)  # diff is rate − ref_rate; the verdict uses the rates
            grid = "" if scheduler == base.scheduler else f" ({scheduler})"
            add(f"{sampler}{grid} {steps} steps", rate, "within 0.05 of DDPM", within_points(rate, ref_rate),
                f"{diff:+.3f} ± {se:.3f} (paired s.e.), {seconds:.2f} s/image")
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def render(rows: list[tuple]) -> str:
    lines = ["| measure | value | target | verdict | notes |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {v:.3f} | {t} | {verdict} | {n} |" for m, v, t, verdict, n in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="24 prompts per object count (a few minutes)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per object count (default 100)")
    p.add_argument("--checkpoint", default=None, help="default: the embedded model")
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--out", default=None, help="also write the table (markdown) and rows (JSON) here")
    args = p.parse_args(argv)
    rows = run(args)
    table = render(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
