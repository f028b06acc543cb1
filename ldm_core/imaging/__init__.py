"""The socket payloads IMAGE, MASK and LATENT and their operations: PNG I/O, resizing,
mask operations, empty latents, cheap per-step previews."""
