"""Sampling-loop overhead: what a sampler step costs besides the UNet.

`python -m bench.sampler_overhead [--quick] [--steps N] [--repeats N] [--out FILE]`

For every sampler in SAMPLERS, the whole loop — sampler arithmetic, noise draws (Brownian
tree for the SDE samplers), CFG batching and combination (CFGGuider), the Denoiser's input
scaling, σ → t lookup and x̂0 — runs over a Karras schedule on a 1×4×64×64 latent with cfg 7
against a stub UNet that returns its input (no compute). Its median wall time, minus the
stub's own calls, divided by the steps is the overhead per step. The reference is one real
UNet call on the CFG batch 2×4×64×64 (SD1.5 widths, random weights from the bench's cached
checkpoint; --quick: the same layout narrowed). Target: overhead per step ≤ 2% of one UNet
call. Samplers with two model calls per step (heun, dpm_2, …) pay the guider twice per step;
the ratio is still per step. CPU fp32; times on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ldm_core.conditioning.cond import Cond
from ldm_core.loading.loader import load_checkpoint
from ldm_core.sampling.denoiser import Denoiser
from ldm_core.sampling.guidance import CFGGuider
from ldm_core.sampling.sampler_table import SAMPLERS
from ldm_core.sampling.schedule import DiscreteSchedule, get_sigmas

from . import weights
from .table import Row, emit, render
from .timing import progress

TARGET = 0.02  # overhead per step / one UNet call
LATENT = 64    # latent side (512² images)
CFG = 7.0
TIMESTEP = 500.0
SEED = 0


class StubUNet:
    """A UNet that costs nothing: ε̂ = its input (counts its calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        self.calls += 1
        return x


def stub_guider(config, stub: StubUNet) -> CFGGuider:
    """The real CFGGuider + Denoiser over the stub: everything of a step but the network."""
    g = torch.Generator().manual_seed(SEED)
    width = config.unet.context_dim
    positive = Cond(context=torch.randn(1, 77, width, generator=g))
    negative = Cond(context=torch.randn(1, 77, width, generator=g))
    denoiser = Denoiser(stub, DiscreteSchedule(config.schedule), config.prediction, torch.float32)
    return CFGGuider(denoiser, config, [positive], [negative], CFG, image_size=(LATENT * 8, LATENT * 8))


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def loop_overheads(config, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{sampler: (overhead seconds per step, model calls per step)} with the stub UNet."""
    stub = StubUNet()
    guider = stub_guider(config, stub)
    schedule = DiscreteSchedule(config.schedule)
    sigmas = get_sigmas(schedule, "karras", steps)
    x0 = torch.randn(1, config.unet.out_channels, LATENT, LATENT, seed=SEED)
    x0 = x0 * (sigmas[0] ** 2 + 1).sqrt()
    probe = torch.randn(2, *x0.shape[1:])
    stub_call = median_seconds(lambda: stub(probe, None, None), 200)  # the stub's own cost, subtracted
    results = {}
    for name, sampler in SAMPLERS.items():
        def run() -> None:
            sampler(guider, x0.clone(), sigmas, seed=SEED)

        stub.calls = 0
        run()
        calls = stub.calls
        total = median_seconds(run, repeats, warmup=0)
        results[name] = ((total - calls * stub_call) / steps, calls / steps)
        progress(f"{name}: {total * 1e3:.1f} ms for {steps} steps ({calls} model calls)")
    return results


@torch.inference_mode()
def unet_call_seconds(path: Path, repeats: int) -> float:
    """Median seconds of one UNet forward on the CFG batch 2×4×64×64."""
    ckpt = load_checkpoint(path, device="cpu")
    config = ckpt.config
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, config.unet.in_channels, LATENT, LATENT, generator=g)
    t = torch.full((2,), TIMESTEP)
    context = torch.randn(2, 77, config.unet.context_dim, generator=g)
    unet = ckpt.model.unet
    seconds = median_seconds(lambda: unet(x, t, context), repeats)
    progress(f"UNet call 2×4×{LATENT}×{LATENT}: {seconds:.3f} s")
    return seconds


def run(quick: bool, cache_dir: Path, steps: int, repeats: int | None) -> list[Row]:
    config = weights.bench_config(quick)
    path = weights.ensure_checkpoint(cache_dir, quick)
    # The loops first, in a process not yet holding the UNet (its gigabytes of freed attention
    # buffers and busy threads would only add noise to millisecond timings).
    overheads = loop_overheads(config, steps, repeats or (3 if quick else 7))
    unet_s = unet_call_seconds(path, repeats or (2 if quick else 3))
    return [
        Row(name, per_step, unet_s, TARGET,
            f"ratio {per_step / unet_s:.1e}; {calls:g} model call{'s' if calls != 1 else ''}/step")
        for name, (per_step, calls) in overheads.items()
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="narrow UNet widths (same layout), fewer repeats")
    p.add_argument("--steps", type=int, default=20, help="steps per sampling loop (default 20)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default: 7 loops, 3 UNet calls; "
                                              "--quick: 3 and 2)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/ldm-bench"), help="where the checkpoint is kept")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps: need at least 2, got {args.steps}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats: need at least 1, got {args.repeats}")
    rows = run(args.quick, args.cache_dir, args.steps, args.repeats)
    width = "narrow (--quick)" if args.quick else "SD1.5"
    emit([
        f"# sampling-loop overhead per step vs one UNet call ({width} widths, CFG batch 2×4×{LATENT}×{LATENT}, "
        f"CPU fp32, {args.steps} Karras steps)",
        "",
        "ours = loop time per step with a zero-cost UNet (sampler + CFG guider + denoiser wrapper); "
        "reference = one real UNet call. Shared machine: timings are noisy.",
        "",
        render(rows),
    ], args.out)
    return 0 if all(r.verdict != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
