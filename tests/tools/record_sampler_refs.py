"""Record ComfyUI's sigma schedules and sampler outputs as fixtures for tests/sampling/test_schedule.py and
tests/sampling/test_solvers.py.

Schedules: `comfy.samplers.calculate_sigmas` for every scheduler and a few step counts on the SD
scaled-linear schedule (and on its zero-terminal-SNR variant), BasicScheduler with denoise < 1,
and KSampler's sigmas for the samplers that discard the penultimate σ.

Samplers: every k-diffusion sampler (and UniPC) of ComfyUI run on a toy denoiser with a known
form (Gaussian-data denoiser plus a mildly nonlinear term, restated in the tests), from the same
x, sigmas and seed; inputs and outputs go to tests/data/samplers_comfyui.safetensors.

Run with ComfyUI's interpreter, from its checkout (ComfyUI v0.3.64, commit
637221995f7424a561bd825de3e61ea117dfe1e3):

    cd /tmp/comfy_probe/ComfyUI && /tmp/comfy_probe/venv/bin/python \\
        /work/main/tests/tools/record_sampler_refs.py /work/main/tests/data
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, ".")
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.k_diffusion.sampling as kds  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.samplers  # noqa: E402
from comfy.extra_samplers import uni_pc  # noqa: E402
from comfy_extras.nodes_custom_sampler import BasicScheduler  # noqa: E402

COMFY_COMMIT = "637221995f7424a561bd825de3e61ea117dfe1e3"
SEED = 1234


class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    pass


class FakePatcher:
    def __init__(self, ms):
        self.ms = ms

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.ms


def model_sampling(zsnr: bool = False):
    cfg = type("Cfg", (), {"sampling_settings": {"beta_schedule": "linear", "linear_start": 0.00085,
                                                  "linear_end": 0.012, "zsnr": zsnr}})()
    return Sampling(cfg)


# ---- the toy denoiser (restated in tests/sampling/test_solvers.py) -------------------------------------
MU = torch.tensor([0.3, -0.5, 0.1]).reshape(1, 3, 1, 1)
S = torch.tensor([0.5, 1.0, 0.8]).reshape(1, 3, 1, 1)
NONLIN = 0.05


def toy_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D(x, σ) = μ + s²/(s² + σ²)·(x − μ) + k·σ/(1 + σ²)·tanh(x): exact for Gaussian data when k = 0;
    the tanh term makes the slope depend on x nonlinearly, so multistep history matters."""
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU) + NONLIN * sigma.reshape(-1, 1, 1, 1) / (1 + s2) * torch.tanh(x)


class ToyModel:
    """What ComfyUI's samplers call: model(x, σ, **extra_args), with the attributes they look up."""

    def __init__(self, ms):
        self.inner_model = type("Inner", (), {})()
        self.inner_model.inner_model = type("Inner2", (), {"model_sampling": ms})()
        self.inner_model.model_patcher = FakePatcher(ms)
        self.calls = 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return toy_denoise(x, sigma)


def record_schedules(out: Path) -> None:
    ms, zsnr = model_sampling(), model_sampling(zsnr=True)
    patcher = FakePatcher(ms)
    data = {"comfyui_commit": COMFY_COMMIT, "calculate_sigmas": {}, "zsnr": {}, "basic_scheduler": {},
            "ksampler": {}}
    for name in comfy.samplers.SCHEDULER_NAMES:
        data["calculate_sigmas"][name] = {
            str(n): comfy.samplers.calculate_sigmas(ms, name, n).tolist() for n in (1, 2, 3, 7, 20, 33)}
        data["zsnr"][name] = {str(n): comfy.samplers.calculate_sigmas(zsnr, name, n).tolist() for n in (4, 10)}
        data["basic_scheduler"][name] = {
            f"{n}@{d}": BasicScheduler().get_sigmas(patcher, name, n, d)[0].tolist()
            for n, d in ((10, 0.6), (7, 0.33), (4, 0.0))}
    for sampler in ("dpm_2", "uni_pc", "euler"):
        for scheduler in ("normal", "karras"):
            k = comfy.samplers.KSampler(patcher, 6, "cpu", sampler, scheduler, 0.75)
            data["ksampler"][f"{sampler}/{scheduler}/6@0.75"] = k.sigmas.tolist()
            k = comfy.samplers.KSampler(patcher, 5, "cpu", sampler, scheduler, 1.0)
            data["ksampler"][f"{sampler}/{scheduler}/5@1.0"] = k.sigmas.tolist()
    data["model_sigmas"] = {"sd": ms.sigmas.tolist()[:3] + ms.sigmas.tolist()[-3:],
                            "zsnr": zsnr.sigmas.tolist()[:3] + zsnr.sigmas.tolist()[-3:]}
    (out / "schedules_comfyui.json").write_text(json.dumps(data))


SAMPLER_FNS = {
    "euler": kds.sample_euler,
    "euler_ancestral": kds.sample_euler_ancestral,
    "heun": kds.sample_heun,
    "dpm_2": kds.sample_dpm_2,
    "dpm_2_ancestral": kds.sample_dpm_2_ancestral,
    "lms": kds.sample_lms,
    "dpmpp_2s_ancestral": kds.sample_dpmpp_2s_ancestral,
    "dpmpp_sde": kds.sample_dpmpp_sde,
    "dpmpp_2m": kds.sample_dpmpp_2m,
    "dpmpp_2m_sde": kds.sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": kds.sample_dpmpp_3m_sde,
    "ddpm": kds.sample_ddpm,
    "lcm": kds.sample_lcm,
    "ddim": kds.sample_euler,  # ComfyUI's "ddim" is sampler_object("ddim") = Euler (+ random inpaint noise)
    "uni_pc": uni_pc.sample_unipc,
    "uni_pc_bh2": uni_pc.sample_unipc_bh2,
}


def record_samplers(out: Path) -> None:
    ms = model_sampling()
    g = torch.Generator().manual_seed(7)
    tensors = {"mu": MU.clone(), "s": S.clone(), "nonlin": torch.tensor(NONLIN)}
    schedules = {
        "normal8": comfy.samplers.calculate_sigmas(ms, "normal", 8),
        "karras12": comfy.samplers.calculate_sigmas(ms, "karras", 12),
        "partial5": comfy.samplers.calculate_sigmas(ms, "normal", 10)[-6:],  # img2img tail, σ_0 < σ_max
    }
    x0 = MU + S * torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    for sname, sigmas in schedules.items():
        tensors[f"sigmas/{sname}"] = sigmas.float().clone()
        x = (x0 + noise * sigmas[0]).float()
        tensors[f"x/{sname}"] = x.clone()
        for name, fn in SAMPLER_FNS.items():
            model = ToyModel(ms)
            y = fn(model, x.clone(), sigmas.clone(), extra_args={"seed": SEED}, callback=None, disable=True)
            tensors[f"out/{sname}/{name}"] = y.float().clone()
            tensors[f"calls/{sname}/{name}"] = torch.tensor(model.calls)
    save_file(tensors, str(out / "samplers_comfyui.safetensors"),
              metadata={"comfyui_commit": COMFY_COMMIT, "seed": str(SEED)})


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
    record_schedules(out)
    record_samplers(out)
    print("wrote", out / "schedules_comfyui.json", out / "samplers_comfyui.safetensors")


if __name__ == "__main__":
    main()
