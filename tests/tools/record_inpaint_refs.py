"""Record ComfyUI's inpainting and mask numbers on small deterministic inputs.

Run with ComfyUI's own interpreter (ComfyUI v0.3.64, commit
637221995f7424a561bd825de3e61ea117dfe1e3), from the repository root:

    /tmp/comfy_probe/venv/bin/python tests/tools/record_inpaint_refs.py /tmp/comfy_probe/ComfyUI

Writes tests/data/inpaint_refs.safetensors: inputs and outputs of ImagePadForOutpaint,
GrowMask, FeatherMask, ImageCompositeMasked, VAEEncodeForInpaint and
InpaintModelConditioning (with a stand-in VAE whose "latent" is the cropped picture itself,
so the pixel work is what gets recorded), the sampler's noise-mask resize (prepare_mask),
the inpaint model's concatenated input (BaseModel.concat_cond) and a whole masked Euler run
(KSAMPLER + KSamplerX0Inpaint) on the exact denoiser of Gaussian data. Metadata names each
case's parameters. CI never runs this; tests/conditioning/test_inpaint.py reads the file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "inpaint_refs.safetensors"
COMMIT = "637221995f7424a561bd825de3e61ea117dfe1e3"
DATA_STD = 0.8  # Gaussian data N(0, s²): D(x, σ) = x·s²/(s² + σ²) exactly


class StubVAE:
    """ComfyUI's VAE interface with encode = the cropped picture, channels first."""

    downscale_ratio = 8

    def encode(self, pixels):
        f = self.downscale_ratio
        for d in (1, 2):
            keep = pixels.shape[d] // f * f
            if keep != pixels.shape[d]:
                pixels = pixels.narrow(d, (pixels.shape[d] % f) // 2, keep)
        return pixels[..., :3].movedim(-1, 1).clone()


def main(comfy_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    import torch
    from safetensors.torch import save_file
    comfy.options.enable_args_parsing()
    import comfy.model_base
    import comfy.model_sampling
    import comfy.sampler_helpers
    import comfy.samplers
    from comfy.k_diffusion import sampling as kd
    from comfy_extras import nodes_mask

    import nodes

    g = torch.Generator().manual_seed(1234)
    t: dict[str, torch.Tensor] = {}
    meta: dict[str, list] = {}

    # ImagePadForOutpaint
    image = torch.rand(1, 14, 18, 3, generator=g)
    t["pad/image"] = image
    meta["pad"] = [[8, 0, 8, 8, 3], [0, 8, 0, 0, 5], [8, 8, 8, 8, 0], [8, 0, 0, 0, 8], [0, 0, 8, 8, 6]]
    for k, args in enumerate(meta["pad"]):
        img, mask = nodes.ImagePadForOutpaint().expand_image(image, *args)
        t[f"pad/{k}/image"], t[f"pad/{k}/mask"] = img, mask

    # GrowMask (soft mask with a few hard blobs)
    mask = torch.rand(2, 12, 14, generator=g) * 0.3
    mask[0, 3:6, 4:9] = 1.0
    mask[1, 8:, 0:3] = 0.7
    t["grow/mask"] = mask
    meta["grow"] = [[3, True], [3, False], [-2, True], [-1, False], [0, True]]
    for k, (expand, tapered) in enumerate(meta["grow"]):
        t[f"grow/{k}"] = nodes_mask.GrowMask().expand_mask(mask, expand, tapered)[0]

    # FeatherMask
    mask = torch.rand(2, 10, 12, generator=g) * 0.5 + 0.5
    t["feather/mask"] = mask
    meta["feather"] = [[3, 2, 4, 5], [0, 0, 12, 0], [20, 0, 0, 20], [1, 1, 1, 1]]
    for k, args in enumerate(meta["feather"]):
        t[f"feather/{k}"] = nodes_mask.FeatherMask().feather(mask, *args)[0]

    # ImageCompositeMasked
    dest = torch.rand(2, 12, 14, 3, generator=g)
    src = torch.rand(1, 8, 10, 3, generator=g)
    src_alpha = torch.rand(1, 8, 10, 4, generator=g)
    cmask = torch.rand(1, 6, 7, generator=g)
    t.update({"comp/dest": dest, "comp/src": src, "comp/src_alpha": src_alpha, "comp/mask": cmask})
    meta["comp"] = [[3, 5, False, True, False], [15, 12, False, True, False], [0, 0, True, True, False],
                    [2, 1, False, False, False], [4, 4, False, True, True], [30, 2, False, True, False]]
    for k, (x, y, resize, use_mask, alpha) in enumerate(meta["comp"]):
        s = src_alpha if alpha else src
        t[f"comp/{k}"] = nodes_mask.ImageCompositeMasked().composite(dest, s, x, y, resize,
                                                                       cmask if use_mask else None)[0]

    # VAEEncodeForInpaint (stub VAE: the "latent" is the greyed, cropped picture)
    pixels = torch.rand(1, 21, 27, 3, generator=g)
    pmask = (torch.rand(1, 13, 17, generator=g) > 0.6).float() * torch.rand(1, 13, 17, generator=g)
    t["enc/pixels"], t["enc/mask"] = pixels, pmask
    meta["enc"] = [0, 6, 5, 1]
    for k, grow in enumerate(meta["enc"]):
        out = nodes.VAEEncodeForInpaint().encode(StubVAE(), pixels, pmask, grow)[0]
        t[f"enc/{k}/samples"], t[f"enc/{k}/noise_mask"] = out["samples"], out["noise_mask"]

    # InpaintModelConditioning
    pos, neg, latent = nodes.InpaintModelConditioning().encode([[torch.zeros(1), {}]], [[torch.zeros(1), {}]],
                                                               pixels, StubVAE(), pmask, True)
    t["imc/concat_latent_image"] = pos[0][1]["concat_latent_image"]
    t["imc/concat_mask"] = pos[0][1]["concat_mask"]
    t["imc/samples"], t["imc/noise_mask"] = latent["samples"], latent["noise_mask"]

    # The sampler's noise mask on the latent, and the inpaint model's concat input
    noise = torch.randn(2, 4, 5, 6, generator=g)
    latent_image = torch.randn(2, 4, 5, 6, generator=g)
    mask_px = torch.rand(1, 1, 40, 48, generator=g)
    prepared = comfy.sampler_helpers.prepare_mask(mask_px, noise.shape, "cpu")
    t.update({"cc/noise": noise, "cc/latent_image": latent_image, "cc/mask_px": mask_px, "cc/prepared": prepared})
    concat_latent = torch.randn(1, 4, 6, 8, generator=g)
    concat_mask = torch.rand(1, 1, 48, 64, generator=g)
    t["cc/concat_latent"], t["cc/concat_mask"] = concat_latent, concat_mask

    class Stub:
        concat_keys = ()

    stub = Stub()
    comfy.model_base.BaseModel.set_inpaint(stub)
    stub.process_latent_in = lambda x: x * 0.18215
    cases = {
        "given": dict(concat_latent_image=concat_latent, concat_mask=concat_mask, denoise_mask=prepared),
        "from_noise_mask": dict(denoise_mask=prepared),
        "nothing": {},
        "latent_only": dict(concat_latent_image=concat_latent),
    }
    meta["cc"] = list(cases)
    for name, kw in cases.items():
        t[f"cc/{name}"] = comfy.model_base.BaseModel.concat_cond(
            stub, noise=noise, latent_image=latent_image, device="cpu", **kw)

    # A masked Euler run on the exact denoiser of Gaussian data
    class Sampling(comfy.model_sampling.EPS):
        sigma_data = 1.0
        sigma_max = torch.tensor(14.614643096923828)

    class Inner:
        model_sampling = Sampling()

        def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):
            return comfy.model_base.BaseModel.scale_latent_inpaint(self, sigma, noise, latent_image)

    class Wrap:
        def __init__(self):
            self.inner_model = Inner()
            self.inner_model.inner_model = self.inner_model

        def __call__(self, x, sigma, **kwargs):
            s = sigma.reshape(-1, 1, 1, 1)
            return x * DATA_STD**2 / (DATA_STD**2 + s**2)

    wrap = Wrap()
    wrap.inner_model = Inner()
    wrap.inner_model.inner_model = wrap.inner_model
    sigmas = torch.tensor([14.614643096923828, 6.0, 2.5, 1.0, 0.3, 0.0])
    x_noise = torch.randn(2, 4, 5, 6, generator=g)
    clean = torch.randn(2, 4, 5, 6, generator=g)
    t.update({"run/sigmas": sigmas, "run/noise": x_noise, "run/latent": clean})
    for name, opts in (("euler", {}), ("ddim", {"random": True})):
        sampler = comfy.samplers.KSAMPLER(kd.sample_euler, inpaint_options=opts)
        out = sampler.sample(wrap, sigmas, {"seed": 77}, None, x_noise.clone(), clean, prepared, disable_pbar=True)
        t[f"run/{name}"] = out
    meta["run"] = {"seed": 77, "data_std": DATA_STD}

    t = {k: v.float().contiguous() for k, v in t.items()}
    save_file(t, str(OUT), metadata={"comfyui_commit": COMMIT, "cases": json.dumps(meta)})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(t)} tensors)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/comfy_probe/ComfyUI")
