"""Training code at tiny size: losses fall, resume is bit-identical, the training-time text
path equals the inference one, the noising matches the engine's σ, export loads."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ldm_core.lab.scenes import SceneConfig, make_scene
from ldm_core.lab.train.autoencoder_stage import (
    AutoencoderStage,
    AutoencoderTrainConfig,
    build_autoencoder,
    kl_divergence,
)
from ldm_core.lab.train.diffusion_stage import (
    SCENES_LAYOUT,
    DiffusionStage,
    DiffusionTrainConfig,
    PromptTokens,
    encode_text,
    layout_tokens,
    load_stage1,
)
from ldm_core.lab.train.ema import EMA, ema_decay
from ldm_core.lab.train.export import export_checkpoint
from ldm_core.lab.train.state import STATE_TENSORS
from ldm_core.loading.loader import load_checkpoint
from ldm_core.networks.config import ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm_core.sampling.schedule import DiscreteSchedule

SCENES = SceneConfig(size=32)
TINY_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8)
TINY_TEXT = TextEncoderConfig(name="clip_tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
TINY_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                       transformer_depth_middle=0, context_dim=32, num_heads=-1, num_head_channels=16,
                       use_linear_in_transformer=True, norm_groups=8)
AE_CONFIG = AutoencoderTrainConfig(vae=TINY_VAE, batch_size=4, lr=1e-3)
TINY_LAYOUT = SCENES_LAYOUT.replace(dim=32, depth=1, heads=1, dim_head=16)
DIFF_CONFIG = DiffusionTrainConfig(unet=TINY_UNET, text=TINY_TEXT, layout=TINY_LAYOUT, batch_size=4, lr=1e-3, lr_warmup=2,
                                   ema_decay=0.9, latent_scale_scenes=32)


def same_state(a, b) -> bool:
    ta, tb = load_file(str(a / STATE_TENSORS)), load_file(str(b / STATE_TENSORS))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "stage1"
    stage = AutoencoderStage(folder, AE_CONFIG, SCENES)
    records = stage.run(16, log_every=1, progress=False)
    return folder, records


def test_autoencoder_loss_decreases(stage1_run):
    folder, records = stage1_run
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"autoencoder loss {first:.4f} -> {last:.4f}")
    assert last < 0.8 * first, (first, last)
    assert (folder / "log.jsonl").read_text().count("\n") == 16


def test_autoencoder_resume_is_bit_identical(tmp_path):
    straight = AutoencoderStage(tmp_path / "a", AE_CONFIG, SCENES)
    straight.run(3, progress=False)
    first = AutoencoderStage(tmp_path / "b", AE_CONFIG, SCENES)
    first.run(1, progress=False)
    again = AutoencoderStage(tmp_path / "b", AE_CONFIG, SCENES)
    assert again.resume() and again.step == 1
    again.run(3, progress=False)
    assert same_state(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match="another config"):
        AutoencoderStage(tmp_path / "b", AE_CONFIG.replace(lr=1e-4), SCENES).resume()


def test_adversarial_term_runs_and_resumes(tmp_path):
    config = AE_CONFIG.replace(disc_weight=0.1, disc_start=1, disc_channels=8)
    a = AutoencoderStage(tmp_path / "a", config, SCENES)
    records = a.run(3, log_every=1, progress=False)
    assert "d_loss" in records[-1] and "d_loss" not in records[0]
    b = AutoencoderStage(tmp_path / "b", config, SCENES)
    b.run(2, progress=False)
    b = AutoencoderStage(tmp_path / "b", config, SCENES)
    b.resume()
    b.run(3, progress=False)
    assert same_state(tmp_path / "a", tmp_path / "b")


def test_kl_known_answer():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_divergence(mean, logvar), torch.zeros(2))
    # one element with μ = 1, σ² = e: ½(1 + e − 1 − 1) = (e − 1)/2
    mean[0, 0, 0, 0], logvar[0, 0, 0, 0] = 1.0, 1.0
    assert kl_divergence(mean, logvar)[0].item() == pytest.approx((torch.e - 1) / 2, rel=1e-6)


def test_ema_known_answer():
    assert ema_decay(0, 0.999) == pytest.approx(0.1) and ema_decay(10**6, 0.999) == 0.999
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, 0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin, step=100)  # decay min(0.5, 101/110) = 0.5
    assert torch.allclose(ema.module.weight, before + 0.5 * (1.0 - before))


def test_training_noising_is_the_engines_sigma():
    """z_t / sqrt(ᾱ_t) = z0 + σ_t ε with σ_t of the sampler's DiscreteSchedule (max rel. Δ ≤ 1e-5)."""
    stage = DiffusionStage.__new__(DiffusionStage)
    DiffusionStage.__init__(stage, "/nonexistent", build_autoencoder(TINY_VAE, 0), DIFF_CONFIG, SCENES)
    sigma = stage.sqrt_one_minus_abar / stage.sqrt_abar
    assert torch.allclose(sigma, DiscreteSchedule(ScheduleConfig()).sigmas, rtol=1e-5)


def test_zero_terminal_snr_training_noising_is_the_engines_sigma():
    """With zero_terminal_snr the training ᾱ_t are those of the sampler's rescaled σ_t, ᾱ_0 is
    unchanged and ᾱ_T is the finite stand-in 4.9e-8 (no signal left at the last step)."""
    config = DIFF_CONFIG.replace(schedule=ScheduleConfig(zero_terminal_snr=True), prediction="v")
    stage = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), config, SCENES)
    sigma = stage.sqrt_one_minus_abar / stage.sqrt_abar
    assert torch.allclose(sigma, DiscreteSchedule(config.schedule).sigmas, rtol=1e-5)
    plain = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), DIFF_CONFIG, SCENES)
    assert stage.sqrt_abar[0].item() == pytest.approx(plain.sqrt_abar[0].item(), rel=1e-6)
    assert stage.sqrt_abar[-1].item() ** 2 == pytest.approx(4.8973451890853435e-08, rel=1e-4)
    assert plain.sqrt_abar[-1].item() > 0.06  # the SD schedule keeps 6.8% of the signal at t = T


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_target_is_what_the_engine_denoiser_inverts(prediction):
    """A network that returns exactly the training target makes the engine's Denoiser give back
    z0 at every t (both parametrizations, both schedules): training and sampling agree."""
    from ldm_core.sampling.denoiser import Denoiser

    for schedule in (ScheduleConfig(), ScheduleConfig(zero_terminal_snr=True)):
        config = DIFF_CONFIG.replace(schedule=schedule, prediction=prediction)
        stage = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), config, SCENES)
        g = torch.Generator().manual_seed(0)
        t = torch.tensor([0, 250, 500, 900, 990] + ([] if prediction == "eps" and schedule.zero_terminal_snr else [999]))
        z0, eps = torch.randn(len(t), 4, 8, 8, generator=g), torch.randn(len(t), 4, 8, 8, generator=g)
        zt, target = stage.noised(z0, t, eps)
        ds = DiscreteSchedule(schedule)
        oracle = lambda x, t_, ctx, y=None: target  # noqa: E731  (checks it was asked at the trained t)
        den = Denoiser(oracle, ds, prediction, torch.float32)
        sigma = ds.sigmas[t]
        x = zt / stage.sqrt_abar[t].view(-1, 1, 1, 1)  # the variance-exploding x = z0 + σ·ε
        got = den(x, sigma, torch.zeros(len(t), 1, 32))
        assert ds.timestep(sigma).tolist() == t.float().tolist()
        err = (got - z0).abs().amax(dim=(1, 2, 3))
        assert (err <= 1e-3 * (1 + sigma)).all(), (prediction, schedule.zero_terminal_snr, err.tolist())


def test_coordinate_channels_known_answer_and_denoiser_appends_them():
    from ldm_core.sampling.denoiser import Denoiser, with_coordinates

    x = torch.zeros(2, 4, 3, 5)
    c = with_coordinates(x)
    assert c.shape == (2, 6, 3, 5) and torch.equal(c[:, :4], x)
    assert c[0, 4, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0] and torch.equal(c[1, 4, 2], c[0, 4, 0])  # x along width
    assert c[0, 5, :, 0].tolist() == [-1.0, 0.0, 1.0] and torch.equal(c[0, 5, :, 4], c[0, 5, :, 0])  # y along height
    seen = []
    den = Denoiser(lambda inp, t, ctx, y=None: seen.append(inp) or inp[:, :4], DiscreteSchedule(ScheduleConfig()), "eps",
                   torch.float32, coord_channels=True)
    den(torch.ones(1, 4, 3, 5), torch.tensor([1.0]), torch.zeros(1, 1, 8))
    assert torch.equal(seen[0][:, 4:], c[:1, 4:])


def test_training_text_path_equals_inference_forward():
    stage = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), DIFF_CONFIG, SCENES)
    tokens = PromptTokens(TINY_TEXT)(["a red circle left of a blue square", ""])
    trained = encode_text(stage.text, tokens)
    inference, _ = stage.text(tokens)
    assert trained.requires_grad
    assert (trained.detach() - inference).abs().max().item() <= 1e-6


@pytest.fixture(scope="module")
def stage2_run(stage1_run, tmp_path_factory):
    folder1, _ = stage1_run
    ae, _ = load_stage1(folder1)
    folder = folder1.parent / "stage2"
    stage = DiffusionStage(folder, ae, DIFF_CONFIG, SCENES)
    records = stage.run(24, log_every=1, progress=False)
    return folder, stage, records


def test_diffusion_loss_decreases_and_latents_are_unit_scale(stage2_run):
    _, stage, records = stage2_run
    fresh = DiffusionStage("/nonexistent", stage.ae, DIFF_CONFIG, SCENES)  # the same run at step 0
    fresh.latent_scale = stage.latent_scale
    before, after = fresh.validation_loss(), stage.validation_loss()
    print(f"validation loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
    from ldm_core.lab.train.scene_batches import scene_batch

    x = scene_batch(DIFF_CONFIG.data_seed, 0, DIFF_CONFIG.latent_scale_scenes, SCENES).images
    z = stage.ae.encode(x).mode() * stage.latent_scale
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)


def test_a_state_caught_between_its_two_files_is_refused(stage1_run, tmp_path):
    """A reader (an export of a run that is saving) that gets one step's tensors and another step's
    JSON is told so, instead of mixing them; a consistent state reads as before."""
    from ldm_core.lab.train.state import STATE_JSON, read_state

    folder, _ = stage1_run
    run = tmp_path / "run"
    run.mkdir()
    for name in (STATE_TENSORS, STATE_JSON):
        (run / name).write_bytes((folder / name).read_bytes())
    tensors, doc = read_state(run)
    assert doc["step"] == 16 and tensors
    (run / STATE_JSON).write_text(json.dumps({**doc, "step": 15}))  # the JSON of the save before
    with pytest.raises(RuntimeError, match="from step 16 but state.json from step 15.*writing its state"):
        read_state(run)


def test_diffusion_resume_is_bit_identical(stage1_run, tmp_path):
    ae, _ = load_stage1(stage1_run[0])
    DiffusionStage(tmp_path / "a", ae, DIFF_CONFIG, SCENES).run(3, progress=False)
    DiffusionStage(tmp_path / "b", ae, DIFF_CONFIG, SCENES).run(1, progress=False)
    again = DiffusionStage(tmp_path / "b", ae, DIFF_CONFIG, SCENES)
    assert again.resume()
    again.run(3, progress=False)
    assert same_state(tmp_path / "a", tmp_path / "b")


def test_export_loads_through_the_engine(stage1_run, stage2_run, tmp_path):
    folder2, stage, _ = stage2_run
    path = export_checkpoint(stage1_run[0], folder2, tmp_path / "scenes.safetensors", dtype=torch.float32)
    ckpt = load_checkpoint(path, device="cpu")
    assert ckpt.config == stage.model_config(TINY_VAE)
    assert ckpt.text_encoder is not None and ckpt.vae is not None
    ema_unet = stage.emas["unet"].module.state_dict()
    assert all(torch.equal(v, ema_unet[k]) for k, v in ckpt.model.unet.state_dict().items())
    # The engine's prompt encoding of the loaded file equals the training-time path (max |Δ| ≤ 1e-5).
    prompt = "a yellow triangle at the bottom"
    cond = ckpt.text_encoder.encode(prompt).context
    with torch.no_grad():
        ours = encode_text(stage.emas["text"].module, PromptTokens(TINY_TEXT)([prompt]))
    assert cond.shape == ours.shape and (cond - ours).abs().max().item() <= 1e-5
    # The box-layout encoder travels in the file and encodes a scene's layout as in training.
    from ldm_core.lab.train.scene_batches import heldout_batch

    scene = heldout_batch(0, 1, SCENES).scenes[0]
    tokens = layout_tokens(TINY_LAYOUT, [scene])
    with torch.no_grad():
        trained = stage.emas["layout"].module(tokens)
    assert ckpt.layout_encoder is not None and ckpt.config.layout.classes[0] == "red circle"
    assert torch.equal(ckpt.layout_encoder(tokens), trained)
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["ldm_core.train_steps"])
    assert meta == {"autoencoder": 16, "diffusion": 24}
    half = export_checkpoint(stage1_run[0], folder2, tmp_path / "half.safetensors")
    assert half.stat().st_size < 0.6 * path.stat().st_size
    assert load_checkpoint(half, device="cpu").config == ckpt.config


def test_samples_through_the_engine_sampler(stage2_run, tmp_path):
    _, stage, _ = stage2_run
    images = stage.sample(["a red circle in the top left", "a blue square at the bottom"], steps=2, cfg=5.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    again = stage.sample(["a red circle in the top left"], steps=2, cfg=5.0)
    assert torch.equal(again[0], images[0])  # seeded: the same prompt and seed give the same picture
    from ldm_core.lab.train.loop import image_grid

    image_grid([images, images]).save(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 100


def test_stage1_loss_is_l1_plus_weighted_l2_ssim_and_kl(tmp_path):
    """Known answer: the stage-1 loss is mean|x − x̂| + w_mse·mean(x − x̂)² + w_ssim·(1 − SSIM) + w_kl·KL/pixels,
    recomputed here from the same posterior draw; and `ldm-train stage1` trains with the L2 term (STAGE1)."""
    from ldm_core.lab.train import __main__ as cli
    from ldm_core.lab.train.autoencoder_stage import STAGE1, ssim
    from ldm_core.lab.train.scene_batches import scene_batch

    args = cli.argparse.Namespace(run=str(tmp_path / "run"), seed=0, batch_size=None, device="cpu", command="stage1")
    assert cli._stage1(args).config.mse_weight == STAGE1["mse_weight"] > 0
    config = AE_CONFIG.replace(mse_weight=5.0, kl_weight=1e-3)
    stage = AutoencoderStage(tmp_path / "s", config, SCENES)
    x = scene_batch(0, 0, 2, SCENES).images
    state = stage.generator.get_state()
    loss, parts, rec = stage.losses(x, 0)
    stage.generator.set_state(state)
    with torch.no_grad():
        posterior = stage.ae.encode(x)
        again = stage.ae.decode(posterior.sample(stage.generator))
        kl = kl_divergence(posterior.mean, posterior.logvar).mean() / x[0].numel()
        want = ((x - again).abs().mean() + 5.0 * (x - again).square().mean()
                + config.ssim_weight * (1 - ssim(x, again, config.ssim_window)) + 1e-3 * kl)
    assert torch.equal(rec.detach(), again)
    assert parts["mse"] == pytest.approx((x - again).square().mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_refine_trains_the_decoder_only(stage1_run, tmp_path):
    """`ldm-train refine`: the decoder learns on, the encoder (so stage 2's latent space) stays bit-identical."""
    from ldm_core.lab.train.autoencoder_stage import REFINE

    ae, _ = load_stage1(stage1_run[0])
    config = AE_CONFIG.replace(**{**REFINE, "lr": 1e-3, "lr_steps": 8})
    stage = AutoencoderStage(tmp_path / "refine", config, SCENES, init=ae)
    stage.run(8, progress=False)
    enc = {k: v for k, v in ae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    new = stage.ae.state_dict()
    assert all(torch.equal(v, new[k]) for k, v in enc.items())
    assert not torch.equal(ae.decoder.conv_out.weight, stage.ae.decoder.conv_out.weight)


def test_ldm_train_all_runs_every_stage_and_exports(tmp_path, monkeypatch):
    """`ldm-train all` (the shipped model's command) at one step per stage: a file that loads, with
    the shipped stage 2's architecture, trained on the refined autoencoder as it ships (fp16)."""
    from ldm_core.lab.train import __main__ as cli

    monkeypatch.setattr(cli, "SHIPPED_STEPS", {"stage1": 1, "refine": 1, "stage2": 1, "polish": 1})
    out = tmp_path / "m.safetensors"
    assert cli.main(["all", "--run", str(tmp_path / "run"), "--sample-every", "0", "--batch-size", "2",
                     "--to", str(out)]) == 0
    ckpt = load_checkpoint(out, device="cpu")
    assert ckpt.layout_encoder is not None and ckpt.vae.factor == 4
    assert ckpt.config.unet.context_map_gate and ckpt.config.layout.box_features > 0
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["ldm_core.train_steps"])
    assert meta == {"autoencoder": 1, "diffusion": 2}  # the refine run (its own steps); stage 2, then polish
    run = tmp_path / "run"
    assert (run / "stage2" / "state.json").is_file() and (run / cli.POLISH_FOLDER / "state.json").is_file()
    args = dict(seed=0, batch_size=2, device="cpu", command="stage2")
    stage2 = cli._stage2(cli.argparse.Namespace(run=str(run), **args))
    refined, _ = load_stage1(run / "stage1_refine")
    for k, v in refined.state_dict().items():  # stage 2 sees the refined encoder rounded as it ships
        assert torch.equal(stage2.ae.state_dict()[k], v.half().float()), k
    with pytest.raises(SystemExit, match="stage1_refine"):
        cli._stage2(cli.argparse.Namespace(run=str(tmp_path / "empty"), **args))
    with pytest.raises(SystemExit, match="ldm-train polish: no saved run in .*stage2"):
        cli._polish(cli.argparse.Namespace(run=str(tmp_path / "empty"), **args))
    polish = cli._polish(cli.argparse.Namespace(run=str(run), **args))  # it starts from stage 2's EMA weights
    assert stage2.resume() and stage2.step == 1
    for k, v in stage2.emas["unet"].module.state_dict().items():
        assert torch.equal(polish.emas["unet"].module.state_dict()[k], v), k
    if not torch.cuda.is_available():  # a device this torch lacks: a clear exit naming the command
        with pytest.raises(SystemExit, match="ldm-train stage2: device 'cuda'.*--device cpu"):
            cli._stage2(cli.argparse.Namespace(run=str(run), **{**args, "device": "cuda"}))


def test_continue_starts_from_the_saved_run_and_trains_on(stage1_run, stage2_run, tmp_path):
    """Continuing a run (`init=` a run folder): the weights, EMA weights and latent scale of the stage-2 run, a fresh
    optimizer and schedule; it trains on, resumes, and the export counts both runs' steps."""
    folder2, stage, _ = stage2_run
    config = DIFF_CONFIG.replace(snr_gamma=5.0, lr=5e-4, lr_steps=4, data_seed=3, init_seed=3)
    more = DiffusionStage(tmp_path / "more", stage.ae, config, SCENES, init=folder2)
    saved = load_file(str(folder2 / STATE_TENSORS))
    for name, module in more.modules.items():
        assert all(torch.equal(v, saved[f"model.{name}.{k}"]) for k, v in module.state_dict().items())
        assert all(torch.equal(v, saved[f"ema.{name}.{k}"]) for k, v in more.emas[name].state_dict().items())
    assert more.latent_scale == stage.latent_scale and more.init_steps == 24
    more.run(2, progress=False)
    again = DiffusionStage(tmp_path / "more", stage.ae, config, SCENES, init=folder2)
    assert again.resume() and again.step == 2 and again.init_steps == 24
    assert not torch.equal(again.unet.out[-1].weight, saved["model.unet.out.2.weight"])
    path = export_checkpoint(stage1_run[0], tmp_path / "more", tmp_path / "m.safetensors", dtype=torch.float32)
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["ldm_core.train_steps"])
    assert meta["diffusion"] == 26
    with pytest.raises(ValueError, match="architecture"):
        DiffusionStage(tmp_path / "other", stage.ae, config.replace(unet=TINY_UNET.replace(model_channels=32),
                                                                     text=TINY_TEXT), SCENES, init=folder2)
    # a fine-tune onto another schedule and prediction, with coordinate inputs added: the new
    # conv_in columns start at zero (the same function), the rest is loaded, and loss falls on it
    place = config.replace(schedule=ScheduleConfig(zero_terminal_snr=True), prediction="v", snr_gamma=0.0, lr_steps=8,
                           coord_channels=True, unet=TINY_UNET.replace(in_channels=6))
    onto = DiffusionStage(tmp_path / "place", stage.ae, place, SCENES, init=tmp_path / "more")
    assert onto.init_steps == 26
    w_in, old_w = onto.unet.input_blocks[0][0].weight, load_file(str(tmp_path / "more" / STATE_TENSORS))
    assert torch.equal(w_in[:, :4], old_w["model.unet.input_blocks.0.0.weight"]) and not w_in[:, 4:].any()
    before = onto.validation_loss(use_ema=True)
    onto.run(8, progress=False)
    assert onto.validation_loss(use_ema=False) < before
    with pytest.raises(ValueError, match="removed"):
        DiffusionStage(tmp_path / "back", stage.ae, config, SCENES, init=tmp_path / "place")


def test_ground_starts_from_an_exported_checkpoint(stage1_run, stage2_run, tmp_path):
    """Fine-tuning an exported single file (`init=` a file): the UNet gains the context map (zero effect
    at first: the loaded model's output exactly), trains on, resumes, and exports with the file's
    autoencoder to a checkpoint the engine loads with the map."""
    folder2, stage, _ = stage2_run
    base_path = export_checkpoint(stage1_run[0], folder2, tmp_path / "base.safetensors", dtype=torch.float32)
    base = load_checkpoint(base_path, device="cpu")
    from ldm_core.lab.train.diffusion_stage import checkpoint_autoencoder

    ae, vae_config = checkpoint_autoencoder(base_path)
    assert vae_config == TINY_VAE
    config = DIFF_CONFIG.replace(unet=TINY_UNET.replace(context_map_grid=4, context_map_channels=4), lr_steps=4,
                                 data_seed=4, init_seed=4)
    ground = DiffusionStage(tmp_path / "ground", ae, config, SCENES, init=base_path)
    assert ground.latent_scale == pytest.approx(stage.latent_scale) and ground.init_steps == 24
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.equal(ground.unet(x, t, ctx), base.model.unet(x, t, ctx))
        assert torch.equal(ground.emas["unet"].module(x, t, ctx), base.model.unet(x, t, ctx))
    ground.run(3, progress=False)
    assert ground.unet.context_map.proj.weight.abs().max() > 0  # the map learns
    again = DiffusionStage(tmp_path / "ground", ae, config, SCENES, init=base_path)
    assert again.resume() and again.step == 3 and again.init_steps == 24
    path = export_checkpoint(base_path, tmp_path / "ground", tmp_path / "g.safetensors", dtype=torch.float32)
    ckpt = load_checkpoint(path, device="cpu")
    assert ckpt.config == ground.model_config(TINY_VAE) and ckpt.config.unet.context_map_grid == 4
    ema_unet = ground.emas["unet"].module.state_dict()
    assert all(torch.equal(v, ema_unet[k]) for k, v in ckpt.model.unet.state_dict().items())
    assert all(torch.equal(v, base.vae.model.state_dict()[k]) for k, v in ckpt.vae.model.state_dict().items())
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["ldm_core.train_steps"])
    assert meta == {"autoencoder": 16, "diffusion": 27}
    with pytest.raises(ValueError, match="architecture"):
        DiffusionStage(tmp_path / "x", ae, config.replace(unet=config.unet.replace(model_channels=32)), SCENES, init=base_path)


def test_place_continues_a_run_adding_the_gate_and_box_features(stage1_run, tmp_path):
    """Continuing a run with a context map: the map's gate and the layout encoder's box
    features are added at zero effect (the same outputs as the run it continues, model and EMA), train,
    and export to a checkpoint the engine loads with both; a run cannot drop them again."""
    ae, _ = load_stage1(stage1_run[0])
    ground_config = DIFF_CONFIG.replace(unet=TINY_UNET.replace(context_map_grid=4, context_map_channels=4), lr_steps=4)
    ground = DiffusionStage(tmp_path / "ground", ae, ground_config, SCENES)
    ground.run(2, progress=False)
    config = ground_config.replace(unet=ground_config.unet.replace(context_map_gate=True),
                                   layout=TINY_LAYOUT.replace(box_features=2), data_seed=5, init_seed=5)
    place = DiffusionStage(tmp_path / "place", ae, config, SCENES, init=tmp_path / "ground")
    assert place.init_steps == 2 and place.latent_scale == ground.latent_scale
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    tokens = layout_tokens(TINY_LAYOUT, [make_scene(5, i, SCENES) for i in range(2)])
    with torch.no_grad():
        for new, old in ((place.modules, ground.modules), ({k: e.module for k, e in place.emas.items()},
                                                          {k: e.module for k, e in ground.emas.items()})):
            ctx = torch.cat([torch.randn(2, 5, 32), old["layout"](tokens)], 1)
            assert torch.equal(new["layout"](tokens), old["layout"](tokens))
            torch.testing.assert_close(new["unet"](x, t, ctx), old["unet"](x, t, ctx), atol=1e-6, rtol=1e-6)
    place.run(3, progress=False)
    assert place.unet.context_map.gate.weight.abs().max() > 0 and place.layout.transformer.box_emb.weight.abs().max() > 0
    path = export_checkpoint(stage1_run[0], tmp_path / "place", tmp_path / "p.safetensors", dtype=torch.float32)
    ckpt = load_checkpoint(path, device="cpu")
    assert ckpt.config.unet.context_map_gate and ckpt.config.layout.box_features == 2
    ema_layout = place.emas["layout"].module.state_dict()
    assert all(torch.equal(v, ema_layout[k]) for k, v in ckpt.layout_encoder.state_dict().items())
    with pytest.raises(ValueError, match="added, not removed"):
        DiffusionStage(tmp_path / "back", ae, ground_config, SCENES, init=tmp_path / "place")


def test_occupancy_known_answer():
    """The map loss's target: per grid cell, the share of its pixels each class covers."""
    import numpy as np

    from ldm_core.lab.scenes import NUM_CLASSES, make_scene
    from ldm_core.lab.train.diffusion_stage import occupancy

    scene = make_scene(0, 3, SCENES)
    occ = occupancy([scene], 4)
    assert occ.shape == (1, NUM_CLASSES, 4, 4) and torch.allclose(occ.sum(1), torch.ones(1, 4, 4))
    cell = SCENES.size // 4
    for c in range(NUM_CLASSES):  # block averages of the one-hot semantic map, by numpy
        blocks = (scene.semantic == c).reshape(4, cell, 4, cell).mean(axis=(1, 3))
        assert np.allclose(occ[0, c].numpy(), blocks, atol=1e-6)
    obj = scene.objects[0]
    cx, cy = (obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2
    from ldm_core.lab.scenes import class_id

    assert occ[0, class_id(obj.colour, obj.shape), int(cy // cell), int(cx // cell)] > 0


def test_map_cross_entropy_known_answer():
    """Uniform logits cost log(G²) per present class; logits that put all mass where the class is cost ≈ 0;
    absent classes cost nothing."""
    import math

    from ldm_core.lab.scenes import NUM_CLASSES
    from ldm_core.lab.train.diffusion_stage import map_cross_entropy

    occ = torch.zeros(1, NUM_CLASSES, 4, 4)
    occ[0, 0] = 1.0
    occ[0, 0, 1, 2], occ[0, 5, 1, 2] = 0.5, 0.5  # class 5 covers half of one cell
    occ[0, 0, 3, 3], occ[0, 7, 3, 3] = 0.0, 1.0  # class 7 one whole cell
    uniform = torch.zeros(1, NUM_CLASSES, 4, 4)
    assert map_cross_entropy(uniform, occ).item() == pytest.approx(2 * math.log(16), rel=1e-6)
    sharp = uniform.clone()
    sharp[0, 5, 1, 2], sharp[0, 7, 3, 3] = 50.0, 50.0
    assert map_cross_entropy(sharp, occ).item() < 1e-6
    wrong = uniform.clone()
    wrong[0, 5, 0, 0] = 50.0  # all mass on the wrong cell
    assert map_cross_entropy(wrong, occ).item() > 40


@pytest.mark.parametrize("size", [0, 8])
def test_map_loss_trains_the_context_map_to_place_classes(stage1_run, monkeypatch, size):
    """With map_loss, train_step teaches the context map where the caption's objects are: on a batch
    it keeps seeing, the map's cross-entropy against the class coverage falls (the diffusion loss
    trains alongside). `map_loss_size` 8 scores the 4×4 map upsampled to 8×8, as the UNet adds it."""
    import torch.nn.functional as F

    from ldm_core.lab.scenes import NUM_CLASSES
    from ldm_core.lab.train import diffusion_stage as diffusion
    from ldm_core.lab.train.diffusion_stage import map_cross_entropy, occupancy
    from ldm_core.lab.train.scene_batches import scene_batch

    batch = scene_batch(99, 0, 4, SCENES)
    monkeypatch.setattr(diffusion, "scene_batch", lambda *args: batch)

    ae, _ = load_stage1(stage1_run[0])
    config = DIFF_CONFIG.replace(unet=TINY_UNET.replace(context_map_grid=4, context_map_channels=NUM_CLASSES),
                                 map_loss=1.0, lr=3e-3, lr_steps=30, context_map_lr_mult=3.0, map_loss_size=size)
    stage = DiffusionStage("/nonexistent", ae, config, SCENES)
    assert [g["lr_mult"] for g in stage.optimizers["main"].param_groups] == [1.0, 3.0]
    grid = size or 4

    def error() -> float:
        with torch.no_grad():
            ctx = stage.context(batch.captions[:3], stage.text)  # the text part of the batch (1 of 4 has a layout)
            logits = F.interpolate(stage.unet.context_map.grid_map(ctx), size=(grid, grid), mode="bilinear",
                                   align_corners=False)
            return map_cross_entropy(logits, occupancy(batch.scenes[:3], grid)).item()

    before = error()
    logs = [stage.train_step(i) for i in range(30)]
    assert all("map_loss" in r for r in logs) and error() < 0.7 * before, (before, error())
    assert stage.optimizers["main"].param_groups[1]["lr"] == pytest.approx(3 * stage.optimizers["main"].param_groups[0]["lr"])
    with pytest.raises(ValueError, match="map_loss"):
        DiffusionStage("/nonexistent", ae, DIFF_CONFIG.replace(map_loss=1.0), SCENES)


def test_min_snr_loss_weights_known_answers():
    """min-SNR-γ: w_t = min(SNR_t, γ) / SNR_t, SNR_t = ᾱ_t / (1 − ᾱ_t); γ = 0 keeps the plain loss."""
    from ldm_core.sampling.schedule import make_betas

    abar = torch.cumprod(1 - make_betas(ScheduleConfig()), 0)
    snr = abar / (1 - abar)
    stage = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), DIFF_CONFIG.replace(snr_gamma=5.0), SCENES)
    w = stage.loss_weight
    assert w[0].item() == pytest.approx(5.0 / snr[0].item(), rel=1e-5) and w[0] < 0.01  # nearly clean: down-weighted
    assert w[-1].item() == 1.0 and snr[-1] < 5  # pure noise: full weight
    t = int((snr > 5).sum())  # SNR falls with t: the first step at or below γ
    assert w[t - 1] < 1 and w[t].item() == 1.0
    plain = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), DIFF_CONFIG, SCENES)
    assert torch.equal(plain.loss_weight, torch.ones(1000))
    # v-loss weighs the x0 error by SNR + 1, so min-SNR-γ for v is min(SNR, γ)/(SNR + 1)
    v = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0), DIFF_CONFIG.replace(snr_gamma=5.0, prediction="v"),
                       SCENES).loss_weight
    assert v[0].item() == pytest.approx(5.0 / (snr[0].item() + 1), rel=1e-5)
    assert v[-1].item() == pytest.approx(snr[-1].item() / (snr[-1].item() + 1), rel=1e-5)
    # the truncated x0 term: ε-loss · (min(SNR, γ)/SNR + min(1/SNR, c)); 1/SNR at t = 999 is ≈ 213 > c
    x0 = DiffusionStage("/nonexistent", build_autoencoder(TINY_VAE, 0),
                        DIFF_CONFIG.replace(snr_gamma=5.0, x0_weight_max=25.0), SCENES).loss_weight
    assert x0[-1].item() == pytest.approx(1.0 + 25.0) and 1 / snr[-1] > 200
    assert x0[0].item() == pytest.approx(5.0 / snr[0].item() + 1 / snr[0].item(), rel=1e-5)
    mid = int((1 / snr < 4).sum())  # the first t with 1/SNR ≥ 4 (below the cap)
    assert x0[mid].item() == pytest.approx(1.0 + 1 / snr[mid].item(), rel=1e-5)


def test_cosine_lr_known_answers():
    from ldm_core.lab.train.loop import cosine_lr

    assert cosine_lr(-5, 1.0, 0.1, 100) == cosine_lr(0, 1.0, 0.1, 100) == 1.0  # warm-up steps stay at lr
    assert cosine_lr(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert cosine_lr(100, 1.0, 0.1, 100) == cosine_lr(500, 1.0, 0.1, 100) == pytest.approx(0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_diffusion_stage_on_cuda_follows_the_cpu_run(stage1_run, tmp_path):
    """device="cuda": the same scenes and random draws as on the CPU (all drawn there), so the first
    steps' losses agree up to float arithmetic; the saved state is device-free (the CPU resumes it,
    and the export loads), and the sample grid draws."""
    from ldm_core.lab.scenes import NUM_CLASSES

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ae, _ = load_stage1(stage1_run[0])
    config = DIFF_CONFIG.replace(unet=TINY_UNET.replace(context_map_grid=4, context_map_channels=NUM_CLASSES,
                                                        context_map_gate=True), map_loss=0.5, snr_gamma=5.0,
                                 x0_weight_max=25.0)
    cpu = DiffusionStage(tmp_path / "cpu", ae, config, SCENES).run(4, log_every=1, progress=False)
    gpu_stage = DiffusionStage(tmp_path / "gpu", ae, config, SCENES, device="cuda")
    gpu = gpu_stage.run(4, log_every=1, progress=False)
    for a, b in zip(cpu, gpu):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3) and b["map_loss"] == pytest.approx(a["map_loss"], rel=1e-3)
    gpu_stage.write_samples(tmp_path / "gpu" / "samples.png")
    again = DiffusionStage(tmp_path / "gpu", ae, config, SCENES)  # on the CPU
    assert again.resume() and again.step == 4
    again.run(5, progress=False)
    path = export_checkpoint(stage1_run[0], tmp_path / "gpu", tmp_path / "model.safetensors")
    assert load_checkpoint(str(path), device="cpu").layout_encoder is not None
