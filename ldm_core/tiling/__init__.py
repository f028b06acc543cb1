"""Working in tiles: tile geometry, the exact tiled VAE, tiled diffusion (MultiDiffusion) and
feature maps parked on disk."""
