"""Training the embedded model with the project's own code, in the paper's two stages.

Stage 1 (`autoencoder_stage.py`): perceptual compression, an AutoencoderKL trained on
procedural scenes with L1 + structural (SSIM) reconstruction terms, a slight KL penalty
and an optional patch-based adversarial term. Stage 2 (`diffusion_stage.py`): a cross-attention
UNet learns ε in the frozen autoencoder's scaled latent space, conditioned on a small
CLIP-architecture text transformer trained jointly from scratch (classifier-free
guidance dropout, EMA weights). The `ground` stage adds the UNet's context map to the
exported model and teaches it where things go (`diffusion.GROUND`). `loop.py` runs either stage resumably; `export.py`
writes the single-file checkpoint the engine loads; `python -m ldm_core.lab.train` is the CLI.

Nothing here runs at import; no global state: every random draw comes from a
`torch.Generator` that is saved with the run.
"""
