"""Sigma schedulers: bit-for-bit parity with ComfyUI v0.3.64, known answers, split/flip helpers.

The reference sigmas in tests/data/schedules_comfyui.json were recorded from ComfyUI's own
`calculate_sigmas`, BasicScheduler and KSampler (tests/tools/record_sampler_refs.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ldm_core.networks.config import ScheduleConfig
from ldm_core.sampling.sampler_table import SAMPLERS

DISCARD_PENULTIMATE = {name for name, entry in SAMPLERS.items() if entry.discard_penultimate}
from ldm_core.sampling.schedule import (
    SCHEDULERS,
    DiscreteSchedule,
    exponential_sigmas,
    flip_sigmas,
    get_sigmas,
    karras_sigmas,
    kl_optimal_sigmas,
    split_sigmas,
    split_sigmas_denoise,
)

REF = json.loads((Path(__file__).parents[1] / "data" / "schedules_comfyui.json").read_text())
SD = DiscreteSchedule(ScheduleConfig())
ZSNR = DiscreteSchedule(ScheduleConfig(zero_terminal_snr=True))


def test_scheduler_names_and_order_are_comfyuis():
    assert list(SCHEDULERS) == list(REF["calculate_sigmas"])


def test_model_sigmas_match_comfyui_exactly():
    for sched, key in ((SD, "sd"), (ZSNR, "zsnr")):
        s = sched.sigmas.tolist()
        assert s[:3] + s[-3:] == REF["model_sigmas"][key]


def same_float32(got: torch.Tensor, want: list) -> bool:
    """`got` equals ComfyUI's float32 values to within one unit in the last place (and has their length).
    They were recorded bit for bit on one CPU; torch's vectorised exp/log round the last bit differently
    on others (an Intel Xeon with AVX-512 differs by at most 1.2e-7 relative, under one float32 eps)."""
    w = torch.tensor(want, dtype=torch.float32)
    return got.shape == w.shape and bool(((got - w).abs() <= torch.finfo(torch.float32).eps * w.abs()).all())


@pytest.mark.parametrize("name", list(REF["calculate_sigmas"]))
def test_every_scheduler_matches_comfyui_float32(name):
    for steps, want in REF["calculate_sigmas"][name].items():
        got = SCHEDULERS[name](SD, int(steps))
        if name == "kl_optimal" and steps == "1":  # ComfyUI: 0/0 → [nan, 0]; here the one step is σ_max → 0
            assert math.isnan(want[0]) and got.tolist() == pytest.approx([float(SD.sigma_max), 0.0], rel=1e-6)
            continue
        assert got.dtype == torch.float32
        assert same_float32(got, want), (name, steps)
    for steps, want in REF["zsnr"][name].items():
        assert same_float32(SCHEDULERS[name](ZSNR, int(steps)), want), (name, "zsnr", steps)


@pytest.mark.parametrize("name", list(REF["basic_scheduler"]))
def test_denoise_tail_matches_basic_scheduler(name):
    for key, want in REF["basic_scheduler"][name].items():
        steps, denoise = key.split("@")
        assert same_float32(get_sigmas(SD, name, int(steps), float(denoise)), want), (name, key)


def test_ksampler_discards_penultimate_sigma_for_dpm2_and_unipc():
    assert {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"} == DISCARD_PENULTIMATE
    for key, want in REF["ksampler"].items():
        sampler, scheduler, rest = key.split("/")
        steps, denoise = rest.split("@")
        got = get_sigmas(SD, scheduler, int(steps), float(denoise), discard_penultimate=sampler in DISCARD_PENULTIMATE)
        assert same_float32(got, want), key


def test_karras_exponential_kl_known_answers():
    k = karras_sigmas(5, 0.1, 10.0, rho=7.0).double()
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    ref = (10 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10 ** (1 / 7))) ** 7
    torch.testing.assert_close(k[:-1], ref, rtol=2e-6, atol=0)
    assert k[0] == pytest.approx(10.0, rel=1e-6) and k[-2] == pytest.approx(0.1, rel=1e-6) and k[-1] == 0
    e = exponential_sigmas(4, 0.1, 10.0).double()
    torch.testing.assert_close(e[:-1], torch.tensor([10.0, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1], dtype=torch.float64),
                               rtol=2e-6, atol=0)
    kl = kl_optimal_sigmas(3, 0.1, 10.0).double()  # middle point: tan of the mean angle
    assert kl[1] == pytest.approx(math.tan((math.atan(0.1) + math.atan(10.0)) / 2), rel=1e-6)
    assert kl[1] == pytest.approx(1.0, rel=1e-6)  # atan(0.1) + atan(10) = π/2


def test_every_scheduler_descends_to_zero():
    for name in SCHEDULERS:
        s = get_sigmas(SD, name, 12)
        assert s[-1] == 0 and bool((s[:-1] > 0).all()), name
        assert bool((s[1:] <= s[:-1]).all()), name


def test_get_sigmas_errors_name_the_input():
    with pytest.raises(ValueError, match="unknown scheduler 'nope'.*karras"):
        get_sigmas(SD, "nope", 10)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        get_sigmas(SD, "normal", 0)
    assert len(get_sigmas(SD, "karras", 10, denoise=0.0)) == 0


def test_split_and_flip_follow_comfyui_nodes():
    s = get_sigmas(SD, "karras", 6)
    high, low = split_sigmas(s, 2)
    assert high.tolist() == s[:3].tolist() and low.tolist() == s[2:].tolist()
    high, low = split_sigmas(s, 99)  # past the end: the whole schedule, then an empty one (slicing)
    assert high.tolist() == s.tolist() and len(low) == 0
    high, low = split_sigmas_denoise(s, 0.5)  # 6 steps: last round(3) steps in the low part
    assert high.tolist() == s[:4].tolist() and low.tolist() == s[3:].tolist()
    high, low = split_sigmas_denoise(s, 0.0)
    assert len(high) == 0 and low.tolist() == s[-1:].tolist()
    high, low = split_sigmas_denoise(s, 1.0)
    assert high.tolist() == s[:1].tolist() and low.tolist() == s.tolist()
    f = flip_sigmas(s)
    assert f[0] == pytest.approx(1e-4) and f[1:].tolist() == s.flip(0)[1:].tolist()
    assert s[-1] == 0  # the input is left alone
    with pytest.raises(ValueError, match="denoise"):
        split_sigmas_denoise(s, 1.5)
