"""Sampling in σ-space: noise schedules, the denoiser wrapper D(x, σ), classifier-free
guidance over regional conditioning, the solvers and the one sampler table."""
